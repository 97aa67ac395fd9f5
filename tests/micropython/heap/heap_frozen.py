"""Code compiled before the measurement, run by the stubs that stand for the modules.

A stub (compiled to .mpy by heap.py) is ``from heap_frozen import run;
run(__name__, globals())``: the
module's body runs from code already on the heap, as frozen code runs from
flash, so the heap it keeps is what a frozen module keeps.
"""

CODES = {}


def run(name, module_globals):
    exec(CODES[name], module_globals)
