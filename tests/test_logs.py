"""Tests of edgenode.logs: the text and JSON line formats, and the journal stream."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgenode.errors import ConfigError
from edgenode.logs import (
    JsonFormatter,
    TextFormatter,
    setup_logging,
    stream_is_journal,
)

# The format edgenode run used before edgenode.logs existed.
OLD_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"
OLD_DATEFMT = "%H:%M:%S"
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

log = logging.getLogger("edgenode.node")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def no_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite itself may run under systemd.
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def record(
    msg: str = "peer up %s", *args: object, created: float = 1_700_000_000.25
) -> logging.LogRecord:
    rec = logging.LogRecord("edgenode.node", logging.INFO, __file__, 1, msg, args, None)
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    return rec


# -- text -------------------------------------------------------------------------------


def test_text_format_is_unchanged() -> None:
    rec = record("peer up %s (node %s, %s)", "10.0.0.2", "abcd", "outbound")
    old = logging.Formatter(OLD_FORMAT, OLD_DATEFMT)
    assert TextFormatter().format(rec) == old.format(rec)


def test_text_lines_go_to_the_stream_at_the_level() -> None:
    out = io.StringIO()
    setup_logging("info", stream=out)
    log.debug("not shown")
    log.info("peer up %s", "10.0.0.2")
    log.warning("peer down %s: %s", "10.0.0.3", "keepalive timeout")
    [up, down] = lines(out)
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} INFO    peer up 10\.0\.0\.2", up)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} WARNING peer down 10\.0\.0\.3: keepalive timeout", down
    )


def test_text_escapes_newlines_so_a_peer_cannot_forge_lines() -> None:
    out = io.StringIO()
    setup_logging("info", stream=out)
    log.warning("peer said bye: %s", "x\n12:00:00.000 INFO    peer up 10.6.6.6\r\x1b[2J")
    [line] = lines(out)
    assert line.endswith("peer said bye: x\\n12:00:00.000 INFO    peer up 10.6.6.6\\r\\x1b[2J")


def test_text_keeps_tabs_and_non_ascii() -> None:
    assert TextFormatter().format(record("topic\tcafé ✓")).endswith("topic\tcafé ✓")


def test_text_puts_a_traceback_after_the_line() -> None:
    out = io.StringIO()
    setup_logging("info", stream=out)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("handler failed")
    first, *rest = lines(out)
    assert first.endswith("ERROR   handler failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


# -- JSON ------------------------------------------------------------------------------


def test_json_lines_parse_and_carry_the_basic_fields() -> None:
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    log.debug("dial %s", "10.0.0.2")
    logging.getLogger("edgenode.state").warning("bad file")
    first, second = (json.loads(line) for line in lines(out))
    assert set(first) == {"ts", "level", "logger", "msg"}
    assert ISO_UTC_MS.match(first["ts"])
    assert first["level"] == "DEBUG"
    assert first["logger"] == "edgenode.node"
    assert first["msg"] == "dial 10.0.0.2"
    assert second["level"] == "WARNING" and second["logger"] == "edgenode.state"


def test_json_timestamp_is_utc_with_milliseconds() -> None:
    line = JsonFormatter().format(record(created=1_700_000_000.2509))
    assert json.loads(line)["ts"] == "2023-11-14T22:13:20.250Z"
    line = JsonFormatter().format(record(created=0.9999999))
    assert json.loads(line)["ts"] == "1970-01-01T00:00:00.999Z"


def test_json_carries_peer_node_id_and_reason_extras() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    extra = {"peer": "10.0.0.3", "node_id": "abcd-efgh", "reason": "keepalive timeout", "other": 1}
    log.warning("peer down %s", "10.0.0.3", extra=extra)
    [line] = lines(out)
    fields = json.loads(line)
    assert fields["peer"] == "10.0.0.3"
    assert fields["node_id"] == "abcd-efgh"
    assert fields["reason"] == "keepalive timeout"
    assert "other" not in fields


def test_json_folds_an_exception_into_one_line() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("handler for %r failed", "sensors/t")
    [line] = lines(out)
    fields = json.loads(line)
    assert fields["level"] == "ERROR"
    assert fields["msg"] == "handler for 'sensors/t' failed"
    assert fields["exc"].startswith("Traceback (most recent call last):")
    assert fields["exc"].endswith("ValueError: boom\nsecond line")


def test_json_keeps_a_multi_line_message_on_one_line() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log.info("peer said bye: %s", "a\nb\r\nc", stack_info=True)
    [line] = lines(out)
    fields = json.loads(line)
    assert fields["msg"] == "peer said bye: a\nb\r\nc"
    assert fields["stack"].startswith("Stack (most recent call last):")


def test_json_survives_odd_values() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log.info("bytes %s", b"\xff", extra={"peer": object(), "reason": b"\x00"})
    log.info("surrogate %s", "\udcff")
    one, two = (json.loads(line) for line in lines(out))
    assert one["peer"].startswith("<object object at")
    assert one["reason"] == "b'\\x00'"
    assert two["msg"] == "surrogate \udcff"
    assert out.getvalue().isascii()


def test_json_survives_a_bad_format_string() -> None:
    # A bug in a log call still gives one line, not logging's multi-line error.
    line = JsonFormatter().format(record("bad format %d", "text"))
    assert "\n" not in line
    assert json.loads(line)["msg"].startswith(
        "'bad format %d' (cannot format with args ('text',): TypeError('%d format: "
    )


# -- setup -----------------------------------------------------------------------------


def test_setup_replaces_its_own_handler_only() -> None:
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    first = setup_logging("info", stream=io.StringIO())
    second = setup_logging("warning", "json", stream=io.StringIO())
    assert first not in root.handlers
    assert second in root.handlers and other in root.handlers
    assert root.level == logging.WARNING


def test_setup_accepts_any_case_of_level() -> None:
    setup_logging("DEBUG", stream=io.StringIO())
    assert logging.getLogger().level == logging.DEBUG


def test_setup_rejects_an_unknown_level() -> None:
    with pytest.raises(
        ConfigError, match=r"^log level: expected one of debug, info, warning, error, got 'loud'$"
    ):
        setup_logging("loud")


def test_setup_rejects_an_unknown_format() -> None:
    with pytest.raises(ConfigError, match=r"^log format: expected one of text, json, got 'xml'$"):
        setup_logging("info", "xml")


# -- the journal -------------------------------------------------------------------------


@pytest.fixture
def journal_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[io.TextIOWrapper]:
    """A file standing in for the journal stream, named in $JOURNAL_STREAM."""
    with open(tmp_path / "journal", "w+") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield f


def test_journal_text_drops_the_time_and_adds_the_priority(journal_file: io.TextIOWrapper) -> None:
    setup_logging("debug", stream=journal_file)
    log.debug("dial %s", "10.0.0.2")
    log.info("peer up %s", "10.0.0.2")
    log.warning("peer down %s", "10.0.0.2")
    log.error("failed")
    log.critical("very failed")
    journal_file.seek(0)
    assert journal_file.read().splitlines() == [
        "<7>DEBUG   dial 10.0.0.2",
        "<6>INFO    peer up 10.0.0.2",
        "<4>WARNING peer down 10.0.0.2",
        "<3>ERROR   failed",
        "<2>CRITICAL very failed",
    ]


def test_journal_json_keeps_its_timestamp(journal_file: io.TextIOWrapper) -> None:
    setup_logging("info", "json", stream=journal_file)
    log.warning("peer down %s", "10.0.0.2", extra={"peer": "10.0.0.2"})
    journal_file.seek(0)
    [line] = journal_file.read().splitlines()
    assert line.startswith("<4>{")
    fields = json.loads(line[3:])
    assert ISO_UTC_MS.match(fields["ts"]) and fields["peer"] == "10.0.0.2"


def test_journal_stream_must_be_this_stream(journal_file: io.TextIOWrapper, tmp_path: Path) -> None:
    # A child that inherited JOURNAL_STREAM but writes elsewhere keeps the time.
    assert stream_is_journal(journal_file)
    with open(tmp_path / "elsewhere", "w+") as other:
        assert not stream_is_journal(other)
        setup_logging("info", stream=other)
        log.info("peer up")
        other.seek(0)
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} INFO    peer up\n", other.read())


@pytest.mark.parametrize("value", ["", "12", "a:b", "1:2:3", ":5"])
def test_journal_stream_ignores_a_malformed_variable(
    value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    with open(tmp_path / "f", "w") as f:
        assert not stream_is_journal(f)


def test_journal_stream_is_false_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not stream_is_journal(io.StringIO())


def test_node_peer_events_carry_fields_in_json_lines(tmp_path: Path) -> None:
    """A real `edgenode run` pair: the peer-up line carries the peer and its node ID."""
    import socket
    import subprocess
    import sys

    from edgenode.identity import create_identity
    from edgenode.trust import add_authorised

    ids = {n: create_identity(tmp_path / n).node_id for n in ("a", "b")}
    for me, other in (("a", "b"), ("b", "a")):
        add_authorised(tmp_path / me / "authorised_nodes", ids[other])
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    common = ["--log-format", "json", "--keepalive-interval", "0.5"]
    a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgenode",
            "run",
            "--state-dir",
            str(tmp_path / "a"),
            "--listen",
            f"127.0.0.2:{port}",
            *common,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    b = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgenode",
            "run",
            "--state-dir",
            str(tmp_path / "b"),
            "--listen",
            "127.0.0.3:0",
            "--peer",
            f"127.0.0.2:{port}",
            *common,
        ],
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert a.stderr is not None
        for line in a.stderr:  # bounded by the test timeout
            record = json.loads(line)
            if record["msg"].startswith("peer up"):
                assert record["peer"] == "127.0.0.3"
                assert record["node_id"] == ids["b"]
                break
    finally:
        for proc in (b, a):
            proc.terminate()
            proc.wait(timeout=10)
