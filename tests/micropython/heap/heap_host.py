"""Heap measurement, host side: a host Link in a runtime of its own (its heap is not measured).

``setup(mode)`` returns the mailbox's address; ``step()`` feeds the link what
the device sent, runs its timers, answers requests, sends the host's share of
the scenario as room allows, and returns 1 once everything the device owes
has arrived, 2 on a wrong message, else 0.
"""

# ruff: noqa: I001  (local modules first, as the runtime finds them)

import time

from mailbox import Mailbox
import scenario

from firmware_bridge.link import MEMORY_TOPIC, Link, Received, SessionUp

_s = {}


def setup(mode):
    opts = scenario.options(mode)
    link = Link("host", "node-a", scenario.HOST_EPOCH, psk=opts["psk"], reliable=opts["reliable"])
    box = Mailbox(2048)
    _s.update(
        link=link,
        box=box,
        start=time.ticks_ms(),
        data=0,
        responses=0,
        sent_data=0,
        sent_requests=0,
        up=False,
        error=None,
        payload=scenario.payload(),
        reports=0,
        need_report="pressure" in mode,
        answers=[],
        out_of_memory_answers=0,
    )
    link.start(0)
    _flush()
    return box.address()


def _now():
    return time.ticks_diff(time.ticks_ms(), _s["start"])


def _flush():
    box = _s["box"]
    link = _s["link"]
    room = box.room()
    if room > 0 and link.pending_output:
        box.put(link.bytes_to_send(room))


def _bad(why):
    if _s["error"] is None:
        _s["error"] = why
        print("HOST " + why)


def state():
    """What the host has seen (printed when a session does not complete)."""
    link = _s["link"]
    return (
        f"host: up={link.is_up} data={_s['data']} responses={_s['responses']} "
        f"reports={_s['reports']} sent={_s['sent_data']}/{_s['sent_requests']} "
        f"answers={len(_s['answers'])} out_of_memory_answers={_s['out_of_memory_answers']} "
        f"room={link.room()}"
    )


def step():
    link = _s["link"]
    box = _s["box"]
    now = _now()
    events = []
    if box.pending():
        events = link.receive_bytes(box.take(4096), now)
    if link.next_deadline_ms() <= now:
        events += link.tick(now)
    payload = _s["payload"]
    for event in events:
        if isinstance(event, SessionUp):
            _s["up"] = True
        elif isinstance(event, Received):
            if event.kind == "data" and event.topic == MEMORY_TOPIC:
                _s["reports"] += 1
            elif event.kind == "data":
                if event.payload != payload:
                    _bad("wrong data payload")
                _s["data"] += 1
            elif event.kind == "request":
                _s["answers"].append((event.req_id, event.payload))
            elif event.kind == "response":
                if _s["need_report"] and event.status == 2 and event.error == "out of memory":
                    _s["out_of_memory_answers"] += 1  # the device said so: nothing silent
                elif event.status != 0 or event.payload != payload:
                    _bad("wrong response")
                _s["responses"] += 1
    if link.is_up:
        answers = _s["answers"]
        while answers and _room(link):
            req_id, body = answers.pop(0)
            link.send_response(req_id, 0, body, now)
        while _s["sent_data"] < scenario.PUBLISHES and _room(link):
            link.send_data(scenario.TOPIC_DATA, payload, now)
            _s["sent_data"] += 1
        while (
            _s["sent_data"] == scenario.PUBLISHES
            and _s["sent_requests"] < scenario.REQUESTS
            and _s["sent_requests"] - _s["responses"] < 2
            and _room(link)
        ):
            link.send_request(_s["sent_requests"], scenario.TOPIC_ECHO, payload, now)
            _s["sent_requests"] += 1
    _flush()
    if _s["error"] is not None:
        return 2
    if _s["data"] > scenario.PUBLISHES:
        _bad("data delivered more than once")
        return 2
    if _s["data"] == scenario.PUBLISHES and _s["responses"] >= scenario.REQUESTS:
        if _s["reports"] or not _s["need_report"]:
            return 1
    return 0


def _room(link):
    room = link.room()
    if room is not None:
        return room > 0
    # Unreliable: as a node would, keep the output short.
    return link.pending_output < 512
