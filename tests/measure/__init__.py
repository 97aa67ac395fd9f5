"""Measurements behind figures in docs/reliability.md (run as ``python -m tests.measure.NAME``)."""
