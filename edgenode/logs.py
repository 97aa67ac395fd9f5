"""Logging for ``edgenode run``: one line per event, as text or as JSON.

``text`` is for people: ``12:04:05.123 INFO    peer up 192.168.1.20 ...``.
``json`` is for machines: one JSON object per line, ``ts`` (ISO 8601, UTC,
milliseconds), ``level``, ``logger``, ``msg``, and ``peer``, ``node_id`` and
``reason`` when the log call passes them as ``extra``. A traceback goes in
an ``exc`` field, so even an exception is one line.

Under systemd the node's stderr is a journal stream (``JOURNAL_STREAM``
names it). The journal stamps every line itself, so the text format drops
its own time, and each line starts with a ``<N>`` syslog priority, which
journald strips and records: ``journalctl -p warning`` then works.

Text a peer controls (a bye's reason, a topic) reaches log messages. In the
text format control characters in a message are escaped, so a peer cannot
forge log lines with a newline; JSON escapes them anyway.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

from .errors import ConfigError

__all__ = [
    "EXTRA_FIELDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "TextFormatter",
    "setup_logging",
    "stream_is_journal",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: ``extra`` keys copied into JSON lines, when a log call passes them.
EXTRA_FIELDS = ("peer", "node_id", "reason")

TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"
TEXT_DATEFMT = "%H:%M:%S"
# The journal adds its own timestamp.
JOURNAL_TEXT_FORMAT = "%(levelname)-7s %(message)s"

# sd-daemon(3) priorities: "<3>" err, "<4>" warning, "<6>" info, "<7>" debug.
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

# C0 and C1 control characters and DEL, except tab, escaped in text lines.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_ESCAPES[0x0A] = "\\n"
_ESCAPES[0x0D] = "\\r"


def _priority(levelno: int) -> int:
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= threshold:
            return _SYSLOG_PRIORITY[threshold]
    return _SYSLOG_PRIORITY[logging.DEBUG]


class TextFormatter(logging.Formatter):
    """The one-line text format; with ``journal``, no time and a ``<N>`` priority.

    A traceback follows on the next lines, as Python prints it; use the
    JSON format where every event must be one line.
    """

    def __init__(self, *, journal: bool = False) -> None:
        if journal:
            super().__init__(JOURNAL_TEXT_FORMAT)
        else:
            super().__init__(TEXT_FORMAT, TEXT_DATEFMT)
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:
        # formatMessage sees only the message; a traceback is added after it.
        line = super().formatMessage(record).translate(_ESCAPES)
        if self.journal:
            return f"<{_priority(record.levelno)}>{line}"
        return line


def _utc_iso(created: float) -> str:
    # Seconds and milliseconds from the same float, so they always agree.
    seconds = int(created)
    millis = min(int((created - seconds) * 1000), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; see the module docstring.

    With ``journal``, the line starts with a ``<N>`` syslog priority that
    journald strips (``journalctl -o cat`` shows the bare JSON).
    """

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        try:
            msg = record.getMessage()
        except Exception as exc:  # a bad format string must not cost the event
            msg = f"{record.msg!r:.200} (cannot format with args {record.args!r:.200}: {exc!r})"
        fields: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": msg,
        }
        extras = record.__dict__
        for name in EXTRA_FIELDS:
            if name in extras:
                fields[name] = extras[name]
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a lone surrogate in a message must not fail the write.
        line = json.dumps(fields, default=str, separators=(",", ":"))
        if self.journal:
            return f"<{_priority(record.levelno)}>{line}"
        return line


def stream_is_journal(stream: IO[str]) -> bool:
    """Return whether ``stream`` is the systemd journal stream in ``$JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a service whose stderr
    goes to the journal. Children inherit the variable even when their
    stderr goes elsewhere, so the stream's own device and inode must match.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file behind it, or closed
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def setup_logging(
    level: str, fmt: str = "text", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send log records of ``level`` and above to ``stream`` (stderr) in format ``fmt``.

    ``level`` is one of :data:`LOG_LEVELS`, ``fmt`` one of :data:`LOG_FORMATS`.
    Installs one handler on the root logger, replacing the one an earlier
    call installed and leaving other handlers alone; returns it. Raises
    :class:`ConfigError` for an unknown level or format.
    """
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log level: expected one of {', '.join(LOG_LEVELS)}, got {level!r:.40}")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log format: expected one of {', '.join(LOG_FORMATS)}, got {fmt!r:.40}")
    target = stream if stream is not None else sys.stderr
    journal = stream_is_journal(target)
    handler = logging.StreamHandler(target)
    handler.setFormatter(
        JsonFormatter(journal=journal) if fmt == "json" else TextFormatter(journal=journal)
    )
    handler._edgenode = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_edgenode", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
