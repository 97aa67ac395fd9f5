"""What ``edgenode watch TOPIC...`` prints: the messages a running node receives.

The lines come from the control socket's ``watch`` op
(:mod:`edgenode.control_watch`); this module renders them, in the
command-line process, as text for people::

    14:02:07.118  127.0.0.3  sensors/temp  21.5
    14:02:07.120  127.0.0.3/pico-e661  sensors/raw  [4 bytes] 01 02 ff 00

or, with ``--json``, as one JSON object per message for scripts. A payload
is shown as text when it is UTF-8 and printable (tabs and line breaks
escaped), else as hex. When messages arrive faster than the watch's rate
(1,000 a second) or than the terminal (or whatever reads the output)
takes them, the node drops the oldest and says how many: the new total
is noted on stderr (at most once a second), and the summary at the end
(Ctrl-C) gives the last.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, TextIO

#: Payload bytes shown in hex in a text line; the rest is elided.
HEX_SHOWN_BYTES = 32
#: Least time between two notes of dropped messages on stderr.
NOTE_INTERVAL_S = 1.0

_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def payload_text(payload: bytes) -> str | None:
    """The payload as printable text (tabs and line breaks escaped), or None if it is not."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.translate(_ESCAPES)
    return text if text.isprintable() else None


def format_message(event: dict[str, Any]) -> str:
    """One text line: local time, peer, topic, payload."""
    payload = bytes.fromhex(event.get("hex", ""))
    size = int(event.get("size", len(payload)))
    text = payload_text(payload)
    if text is None:
        shown = payload[:HEX_SHOWN_BYTES].hex(" ")
        more = " ..." if size > HEX_SHOWN_BYTES else ""
        text = f"[{size} bytes] {shown}{more}".rstrip()
    elif event.get("truncated"):
        text += f" ... ({size} bytes in all)"
    stamp = datetime.fromtimestamp(float(event.get("time", 0.0)))
    clock = stamp.strftime("%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"
    return f"{clock}  {event.get('peer')}  {event.get('topic')}  {text}"


def json_message(event: dict[str, Any]) -> str:
    """One JSON line for scripts: time (ISO 8601, UTC), peer, node ID, topic, payload.

    ``payload`` is the text when the payload is UTF-8 (``"encoding":
    "utf-8"``), else its hex (``"encoding": "hex"``); ``size`` is its length
    in bytes, and ``truncated`` is true when the node sent only its first
    64 KiB.
    """
    payload = bytes.fromhex(event.get("hex", ""))
    try:
        shown, encoding = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        shown, encoding = payload.hex(), "hex"
    stamp = datetime.fromtimestamp(float(event.get("time", 0.0)), timezone.utc)
    obj: dict[str, Any] = {
        "time": stamp.isoformat(timespec="milliseconds"),
        "peer": event.get("peer"),
        "node_id": event.get("node_id"),
        "topic": event.get("topic"),
        "size": event.get("size", len(payload)),
        "payload": shown,
        "encoding": encoding,
    }
    if event.get("truncated"):
        obj["truncated"] = True
    return json.dumps(obj, ensure_ascii=False)


class WatchPrinter:
    """Prints what a watch yields; counts messages and drops."""

    def __init__(self, *, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err
        self.messages = 0
        self.dropped = 0
        self.topics: list[str] = []
        self._noted = 0
        self._noted_at = -NOTE_INTERVAL_S

    def started(self, answer: dict[str, Any]) -> None:
        """Note the node's answer: the topics it watches."""
        self.topics = [str(t) for t in answer.get("watching", [])]
        print(f"watching {', '.join(self.topics)} (Ctrl-C to stop)", file=self.err, flush=True)

    def show(self, events: Iterable[dict[str, Any]]) -> None:
        """Print each event: a message line, or a note on stderr for drops."""
        for event in events:
            kind = event.get("event")
            if kind == "message":
                self.messages += 1
                line = json_message(event) if self.as_json else format_message(event)
                print(line, file=self.out)
            elif kind == "dropped":
                self.dropped = int(event.get("dropped", self.dropped))
                self._note_drops()
        self.out.flush()

    def _note_drops(self) -> None:
        # At most a note a second: a terminal that is behind needs no more lines.
        now = time.monotonic()
        if self.dropped > self._noted and now - self._noted_at >= NOTE_INTERVAL_S:
            self._noted, self._noted_at = self.dropped, now
            self.out.flush()
            print(
                f"{self.dropped:,} messages dropped so far: the node had them faster "
                "than this output took them",
                file=self.err,
                flush=True,
            )

    def summary(self) -> str:
        """What the watch saw, for its end."""
        dropped = f"; {self.dropped:,} dropped (output too slow)" if self.dropped else ""
        return f"watched {', '.join(self.topics) or '-'}: {self.messages:,} messages{dropped}"


def run_watch(path: Any, topics: list[str], *, as_json: bool) -> int:
    """Watch ``topics`` on the node's control socket ``path`` until Ctrl-C; return 0.

    Prints a summary on stderr at the end. Raises what
    :func:`edgenode.control_client.watch_messages` raises (no node, a
    refused watch, the node stopping).
    """
    from .control_client import watch_messages

    printer = WatchPrinter(as_json=as_json, out=sys.stdout, err=sys.stderr)
    lines = watch_messages(path, topics)
    try:
        printer.started(next(lines))
        try:
            for event in lines:
                printer.show((event,))
        except KeyboardInterrupt:
            print(f"\n{printer.summary()}", file=sys.stderr)
            return 0
        except BaseException:
            print(printer.summary(), file=sys.stderr)
            raise
    finally:
        lines.close()
    return 0  # pragma: no cover - the lines end only by raising
