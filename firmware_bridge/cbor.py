"""A strict, compact CBOR (RFC 8949) codec for the subset edgenode speaks.

Runs unchanged on CPython 3.9+ and MicroPython 1.2x: no typing at run time,
no ``from __future__`` import (MicroPython has no such module), annotations
only in forms CPython 3.9 can evaluate.

The subset: null, false, true, integers in [-2**64, 2**64-1], byte strings,
text strings, arrays and maps whose keys are integers or text. Nothing else:
no floats, tags, other simple values or indefinite lengths.

``decode`` is the security edge of the node: every frame a peer sends passes
through it. So it decodes exactly one item that must fill the input, checks
every declared length and count against the bytes that remain *before*
allocating anything, caps nesting depth and the total number of array
elements and map pairs, and raises only :class:`CBORError` on bad input.

Integer heads of any width are accepted (non-shortest forms decode);
``encode`` always writes the shortest form, the same bytes as cbor2.
"""

import struct

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


DEFAULT_MAX_DEPTH = const(8)
DEFAULT_MAX_ITEMS = const(1024)
# Hard ceiling on nesting for both directions: it bounds recursion, which
# matters on a microcontroller's small stack.
MAX_DEPTH = const(32)

_UINT64_MAX = const(0xFFFFFFFFFFFFFFFF)
_HEX_LIMIT = const(16)
_MAJOR_NAMES = ("int", "negative int", "byte string", "text string", "array", "map")
_SIMPLE = {20: False, 21: True, 22: None}
_FLOAT_NAMES = {25: "float16", 26: "float32", 27: "float64"}


class CBORError(ValueError):
    """Bytes are not valid CBOR of the supported subset, or a value cannot be encoded."""


def _hex(data: "bytes | bytearray | memoryview") -> str:
    # Error path only; bytes.hex(sep) is missing on some MicroPython ports.
    shown = " ".join(f"{b:02x}" for b in data[:_HEX_LIMIT])
    if len(data) > _HEX_LIMIT:
        shown += f" ... ({len(data)} bytes)"
    return shown


def _truncated(need: int, pos: int, end: int) -> CBORError:
    return CBORError(f"cbor: truncated: need {need} bytes at offset {pos}, have {end - pos}")


# --- decoding --------------------------------------------------------------


def _reject_major7(ib: int, pos: int) -> CBORError:
    ai = ib & 31
    if ai in _FLOAT_NAMES:
        what = _FLOAT_NAMES[ai] + " (floats are not allowed)"
    elif ai == 31:
        what = "break code outside an indefinite-length item (indefinite lengths are not allowed)"
    elif ai >= 28:
        what = f"reserved additional info {ai}"
    else:
        what = "simple value (only false, true and null are allowed)"
    return CBORError(f"cbor: unsupported {what}: initial byte 0x{ib:02x} at offset {pos}")


def _item(data: bytes, pos: int, end: int, depth: int, state: list) -> "tuple[object, int]":
    """Decode the item at ``pos``; return it and the offset after it.

    ``depth`` is how many more container levels may open; ``state`` is
    ``[items left, max_depth, max_items]``, shared by the whole decode.
    """
    if pos >= end:
        raise _truncated(1, pos, end)
    ib = data[pos]
    major = ib >> 5
    ai = ib & 31
    if major == 7:
        if 20 <= ai <= 22:
            return _SIMPLE[ai], pos + 1
        raise _reject_major7(ib, pos)
    if major == 6:
        raise CBORError(
            f"cbor: unsupported tag (tags are not allowed): initial byte 0x{ib:02x} at offset {pos}"
        )
    start = pos
    pos += 1
    if ai < 24:
        arg = ai
    elif ai < 28:
        width = 1 << (ai - 24)
        if pos + width > end:
            raise _truncated(width, pos, end)
        if width == 1:
            arg = data[pos]
        else:
            arg = int.from_bytes(data[pos : pos + width], "big")
        pos += width
    elif ai == 31:
        raise CBORError(
            f"cbor: unsupported indefinite-length {_MAJOR_NAMES[major]} "
            f"(indefinite lengths are not allowed): initial byte 0x{ib:02x} "
            f"at offset {start}"
        )
    else:
        raise CBORError(
            f"cbor: unsupported reserved additional info {ai}: initial byte "
            f"0x{ib:02x} at offset {start}"
        )

    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major < 4:  # byte or text string
        if arg > end - pos:
            raise CBORError(
                f"cbor: {_MAJOR_NAMES[major]} of {arg} bytes at offset {start} "
                f"exceeds the {end - pos} bytes remaining"
            )
        stop = pos + arg
        if major == 2:
            return data[pos:stop], stop
        try:
            return str(data[pos:stop], "utf-8"), stop
        except UnicodeError:
            raise CBORError(
                f"cbor: text string at offset {start} is not valid utf-8: {_hex(data[pos:stop])}"
            ) from None

    # Array (4) or map (5): every element takes at least one byte, so a
    # count the remaining input cannot hold is rejected before allocating.
    need = arg if major == 4 else 2 * arg
    if need > end - pos:
        unit = "elements" if major == 4 else "pairs"
        raise CBORError(
            f"cbor: {_MAJOR_NAMES[major]} of {arg} {unit} at offset {start} needs "
            f"at least {need} bytes, only {end - pos} remain"
        )
    if depth <= 0:
        raise CBORError(f"cbor: nesting deeper than {state[1]} levels at offset {start}")
    left = state[0] - arg
    if left < 0:
        raise CBORError(
            f"cbor: more than {state[2]} array elements and map pairs in total "
            f"({state[2] - left} with the {_MAJOR_NAMES[major]} at offset {start})"
        )
    state[0] = left
    depth -= 1
    if major == 4:
        out = [None] * arg
        for i in range(arg):
            # Inline the commonest element, a small unsigned int.
            if pos < end and data[pos] < 24:
                out[i] = data[pos]
                pos += 1
            else:
                out[i], pos = _item(data, pos, end, depth, state)
        return out, pos
    result = {}
    for _ in range(arg):
        if pos >= end:
            raise _truncated(1, pos, end)
        kb = data[pos]
        # Keys are ints (majors 0, 1) or text (major 3): initial byte < 0x80,
        # not 0x40-0x5f. Checked before decoding so a key never allocates.
        if kb >= 0x80 or 0x40 <= kb < 0x60:
            raise CBORError(
                f"cbor: map key at offset {pos} must be an int or text string, "
                f"got initial byte 0x{kb:02x}"
            )
        kpos = pos
        key, pos = _item(data, pos, end, depth, state)
        if key in result:
            raise CBORError(f"cbor: duplicate map key {_short_repr(key)} at offset {kpos}")
        result[key], pos = _item(data, pos, end, depth, state)
    return result, pos


def _short_repr(key: "int | str") -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def decode(
    data: "bytes | bytearray | memoryview",
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_bytes: "int | None" = None,
) -> object:
    """Decode the one CBOR item that fills ``data`` and return it.

    Byte strings decode to ``bytes``, text to ``str``, arrays to ``list``,
    maps to ``dict``. ``max_depth`` caps nested arrays and maps (at most
    ``MAX_DEPTH``), ``max_items`` the total of array elements plus map pairs,
    and ``max_bytes``, when given, the length of ``data``.

    Raises :class:`CBORError` for anything that is not exactly one item of
    the supported subset within those limits. Raises ``ValueError`` if
    ``max_depth`` is above ``MAX_DEPTH`` (a caller's bug, not bad input).
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CBORError(
                f"cbor: cannot decode {type(data).__name__} "
                f"(expected bytes, bytearray or memoryview)"
            )
        # One copy, no larger than the input: slices are then plain bytes.
        data = bytes(data)
    end = len(data)
    if max_bytes is not None and end > max_bytes:
        raise CBORError(f"cbor: input of {end} bytes exceeds the {max_bytes}-byte limit")
    if max_depth > MAX_DEPTH:
        raise ValueError(f"cbor: max_depth {max_depth} is above the ceiling of {MAX_DEPTH}")
    value, pos = _item(data, 0, end, max_depth, [max_items, max_depth, max_items])
    if pos != end:
        raise CBORError(
            f"cbor: {end - pos} trailing bytes after item at offset {pos}: {_hex(data[pos:])}"
        )
    return value


# --- encoding --------------------------------------------------------------


def _head(mt: int, n: int) -> bytes:
    # ``mt`` is the major type shifted into the top three bits.
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", mt | 25, n)
    if n < 0x100000000:
        return struct.pack(">BI", mt | 26, n)
    return struct.pack(">BQ", mt | 27, n)


def _encode(obj: object, out: bytearray, depth: int) -> None:
    if obj is None:
        out.append(0xF6)
    elif obj is False:
        out.append(0xF4)
    elif obj is True:
        out.append(0xF5)
    elif isinstance(obj, int):
        if 0 <= obj <= _UINT64_MAX:
            out += _head(0x00, obj)
        elif -_UINT64_MAX - 1 <= obj < 0:
            out += _head(0x20, -1 - obj)
        else:
            # str() of a huge int is slow (and refused past 4300 digits).
            shown = str(obj) if -(10**40) < obj < 10**40 else "of more than 40 digits"
            raise CBORError(f"cbor: cannot encode int {shown} (outside -2**64 .. 2**64-1)")
    elif isinstance(obj, str):
        try:
            raw = obj.encode("utf-8")
        except UnicodeError:  # lone surrogates (CPython only)
            raise CBORError(
                "cbor: cannot encode str that is not valid utf-8 (it contains a lone surrogate)"
            ) from None
        out += _head(0x60, len(raw))
        out += raw
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj) if isinstance(obj, memoryview) else obj
        out += _head(0x40, len(raw))
        out += raw
    elif isinstance(obj, (list, tuple)):
        if depth <= 0:
            raise CBORError(f"cbor: cannot encode nesting deeper than {MAX_DEPTH} levels")
        out += _head(0x80, len(obj))
        for item in obj:
            _encode(item, out, depth - 1)
    elif isinstance(obj, dict):
        if depth <= 0:
            raise CBORError(f"cbor: cannot encode nesting deeper than {MAX_DEPTH} levels")
        out += _head(0xA0, len(obj))
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise CBORError(
                    f"cbor: cannot encode map key of type {type(key).__name__} "
                    f"(keys must be int or str)"
                )
            _encode(key, out, depth - 1)
            _encode(value, out, depth - 1)
    elif isinstance(obj, float):
        raise CBORError("cbor: cannot encode float (floats are not allowed)")
    else:
        raise CBORError(
            f"cbor: cannot encode {type(obj).__name__} (supported: None, bool, "
            f"int, bytes, bytearray, memoryview, str, list, tuple, dict)"
        )


def encode(obj: object) -> bytes:
    """Encode ``obj`` as CBOR with shortest-form heads and return the bytes.

    Supports None, bool, int in [-2**64, 2**64-1], bytes, bytearray,
    memoryview, str, list, tuple, and dict with int or str keys (in the
    dict's iteration order), nested at most ``MAX_DEPTH`` levels.

    Raises :class:`CBORError` for any other type or value.
    """
    out = bytearray()
    _encode(obj, out, MAX_DEPTH)
    return bytes(out)
