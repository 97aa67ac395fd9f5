"""The heap figures in the docs are the ones CI keeps (tests/micropython/heap.py).

The measurement itself runs on the real MicroPython runtime, in
.ci/micropython.sh; these checks keep its record and the docs in step, and
the board profiles within what the record says a board needs.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

from edgenode.profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "tests" / "micropython" / "heap_figures.json"
DOC = ROOT / "docs" / "microcontrollers.md"


def _heap() -> ModuleType:
    path = ROOT / "tests" / "micropython" / "heap.py"
    spec = importlib.util.spec_from_file_location("heap", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_has_every_form_mode_and_figure() -> None:
    heap = _heap()
    record = json.loads(RECORD.read_text())
    assert sorted(record) == sorted(heap.FORMS)
    for form in heap.FORMS:
        assert sorted(record[form]) == sorted(heap.MODES)
        for mode in heap.MODES:
            for name in heap.FIGURES:
                assert record[form][mode][name] > 0, (form, mode, name)


def test_docs_table_is_the_recorded_one() -> None:
    heap = _heap()
    table = heap.table(json.loads(RECORD.read_text()))
    assert table in DOC.read_text(), "docs/microcontrollers.md: paste heap.py's table"


@pytest.mark.parametrize("board", ["esp32", "rp2040"])
def test_board_budget_covers_a_whole_session(board: str) -> None:
    """A profile's memory budget is at least the smallest heap of any mode as .mpy."""
    record = json.loads(RECORD.read_text())
    need = max(row["smallest_heap_bytes"] for row in record["mpy"].values())
    assert load_profile(board).memory_budget_kb * 1024 >= need


def test_check_flags_growth_over_ten_percent() -> None:
    heap = _heap()
    record = json.loads(RECORD.read_text())
    grown = json.loads(json.dumps(record))
    grown["mpy"]["plain"]["import_bytes"] = int(record["mpy"]["plain"]["import_bytes"] * 1.11)
    problems = heap.check(grown, record)
    assert len(problems) == 1 and re.match(
        r"^mpy plain import_bytes: \d+ bytes, more than 10 % above the recorded \d+ \(limit \d+\)$",
        problems[0],
    )
    assert heap.check(record, record) == []
    grown["mpy"]["plain"]["import_bytes"] = int(record["mpy"]["plain"]["import_bytes"] * 1.09)
    assert heap.check(grown, record) == []
