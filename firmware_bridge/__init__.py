"""firmware_bridge: the UART link between an edgenode and a microcontroller.

Runs unchanged on CPython and MicroPython. Its pure modules (codecs and
link protocol) import no I/O and read no clock; the board driver is the only
part that touches a UART. It never imports ``edgenode``.
"""
