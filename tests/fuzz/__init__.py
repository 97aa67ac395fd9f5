"""Fuzzing of every decoder that reads bytes from outside the process.

The short form is the ``test_*.py`` files here: hypothesis property tests,
run by every ``pytest`` (a few seconds). The long form runs the same oracle
over a million inputs per decoder: ``python -m tests.fuzz.long`` (see its
docstring), or these tests with more examples::

    EDGENODE_FUZZ_EXAMPLES=20000 python -m pytest tests/fuzz

``targets.py`` lists the decoders, ``harness.py`` is the oracle every input
must pass, ``mutate.py`` turns valid encodings into near-valid ones.
"""
