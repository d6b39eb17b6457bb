"""The reveal frame: how a RevealRequest and its RevealResponse cross a process boundary.

A frame is a 4-byte big-endian header length, a UTF-8 JSON header, then a binary payload:

* request:  the header holds every RevealRequest field except `blobs`, plus "frame" and
  "blob_lengths"; the payload is the blobs, concatenated.
* response: the header holds every RevealResponse field except `values`, plus "frame" and
  "value_counts"; the payload is the values as little-endian float64, concatenated.

The header fields and their types are read from the dataclasses, so a field added to
RevealRequest or RevealResponse passes through without a codec change. Nothing is pickled:
a frame holds only JSON and raw bytes, and decoding checks every length and type.
"""

import dataclasses
import json
import math
import re
import struct
import typing

import numpy as np

from hetrain.core.errors import FrameError
from hetrain.mpc_ops.reveal.protocol import RevealRequest, RevealResponse

REQUEST_FRAME = "reveal-request/1"
RESPONSE_FRAME = "reveal-response/1"
MEDIA_TYPE = "application/vnd.hetrain.reveal-frame"
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 8  # the header is an object of scalars and lists of scalars: depth 2
# Fields the service writes into its log: short identifiers only, so no control character or
# newline can forge a log line.
IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_LOGGED_FIELDS = {"layer": IDENTIFIER, "kind": IDENTIFIER, "request_id": TOKEN, "key_id": TOKEN}
_LENGTH = struct.Struct(">I")
_FLOAT = np.dtype("<f8")


ROW_ID_BYTES = 32  # one sample pseudonym in the header's 'rows' list: up to 24 hex digits, quotes, comma


def max_request_bytes(max_blobs: int, max_blob_bytes: int, max_rows: int = 0) -> int:
    """Largest request frame of `max_blobs` blobs of at most `max_blob_bytes` each, naming at most
    `max_rows` samples (header allowance included)."""
    return _LENGTH.size + 4096 + 64 * max_blobs + ROW_ID_BYTES * max_rows + max_blobs * max_blob_bytes


# ---- encode ----------------------------------------------------------------------------------


def _plain(value):
    """numpy scalars from the layers become JSON numbers."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"reveal frame: {type(value).__name__} is not JSON-serializable")


def _frame(header: dict, payload: list[bytes]) -> bytes:
    head = json.dumps(header, default=_plain, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([_LENGTH.pack(len(head)), head, *payload])


def encode_request(request: RevealRequest) -> bytes:
    """The request frame: JSON header of the request's fields, then its blobs."""
    header = {"frame": REQUEST_FRAME, **_header_fields(request, "blobs"),
              "blob_lengths": [len(b) for b in request.blobs]}
    return _frame(header, [bytes(b) for b in request.blobs])


def encode_response(response: RevealResponse) -> bytes:
    """The response frame: JSON header of the response's fields, then its values as float64."""
    values = [np.ascontiguousarray(v, dtype=_FLOAT).ravel() for v in response.values]
    header = {"frame": RESPONSE_FRAME, **_header_fields(response, "values"),
              "value_counts": [len(v) for v in values]}
    return _frame(header, [v.tobytes() for v in values])


def _header_fields(obj, payload_field: str) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != payload_field}


# ---- decode ----------------------------------------------------------------------------------


def decode_request(body: bytes, *, max_blobs: int, max_blob_bytes: int) -> RevealRequest:
    """Parse and check a request frame; raise FrameError naming what is wrong."""
    header, payload = _split(body, REQUEST_FRAME, "blob_lengths")
    lengths = _lengths(header, "blob_lengths", limit=max_blobs, item_limit=max_blob_bytes, what="blob")
    if sum(lengths) != len(payload):
        raise FrameError(f"reveal frame: blob_lengths add up to {sum(lengths)} bytes, but the payload holds {len(payload)}")
    blobs, pos = [], 0
    for n in lengths:
        blobs.append(bytes(payload[pos : pos + n]))
        pos += n
    fields = _fields(RevealRequest, header, "blobs", "blob_lengths")
    for name, pattern in _LOGGED_FIELDS.items():
        if name in fields and not pattern.fullmatch(fields[name]):
            raise FrameError(f"reveal frame: '{name}' must match {pattern.pattern} (a short identifier), "
                             f"got {fields[name]!r:.80}")
    return RevealRequest(**fields, blobs=blobs)


def decode_response(body: bytes, *, request: RevealRequest) -> RevealResponse:
    """Parse and check a response frame against the request it answers."""
    header, payload = _split(body, RESPONSE_FRAME, "value_counts")
    counts = _lengths(header, "value_counts", limit=len(request.counts), item_limit=max(request.counts, default=0),
                      what="value count")
    if counts != [int(c) for c in request.counts]:
        raise FrameError(f"reveal frame: the response holds {counts} values per ciphertext, the request asked "
                         f"for {list(request.counts)}")
    if len(payload) != _FLOAT.itemsize * sum(counts):
        raise FrameError(f"reveal frame: {sum(counts)} float64 values need {_FLOAT.itemsize * sum(counts)} "
                         f"payload bytes, got {len(payload)}")
    flat = np.frombuffer(payload, dtype=_FLOAT).astype(np.float64)
    if not np.all(np.isfinite(flat)):
        raise FrameError("reveal frame: the response holds non-finite values")
    values = np.split(flat, np.cumsum(counts)[:-1]) if counts else []
    response = RevealResponse(**_fields(RevealResponse, header, "values", "value_counts"), values=values)
    if response.request_id != request.request_id:
        raise FrameError(f"reveal frame: the response answers request {response.request_id!r}, "
                         f"not {request.request_id!r}")
    return response


def _split(body: bytes, frame: str, lengths_key: str) -> tuple[dict, memoryview]:
    """Header (a JSON object of the right frame kind) and the payload after it."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise FrameError(f"reveal frame: expected bytes, got {type(body).__name__}")
    view = memoryview(body)
    if len(view) < _LENGTH.size:
        raise FrameError(f"reveal frame: {len(view)} bytes is shorter than the {_LENGTH.size}-byte header length")
    (n,) = _LENGTH.unpack_from(view)
    if n > MAX_HEADER_BYTES:
        raise FrameError(f"reveal frame: header length {n} is over the limit of {MAX_HEADER_BYTES} bytes")
    if n > len(view) - _LENGTH.size:
        raise FrameError(f"reveal frame: header length {n} runs past the end of the {len(view)}-byte frame")
    try:
        header = json.loads(bytes(view[_LENGTH.size : _LENGTH.size + n]).decode("utf-8"),
                            parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"reveal frame: the header is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise FrameError(f"reveal frame: the header nests deeper than {MAX_HEADER_DEPTH} levels") from None
    _check_depth(header)
    if not isinstance(header, dict):
        raise FrameError(f"reveal frame: the header must be a JSON object, got {type(header).__name__}")
    if header.get("frame") != frame:
        raise FrameError(f"reveal frame: 'frame' must be {frame!r}, got {header.get('frame')!r}")
    if lengths_key not in header:
        raise FrameError(f"reveal frame: header field '{lengths_key}' is required")
    return header, view[_LENGTH.size + n :]


def _check_depth(header) -> None:
    """Refuse nesting past MAX_HEADER_DEPTH before anything recurses into the header (repr, checks)."""
    stack = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_HEADER_DEPTH:
            raise FrameError(f"reveal frame: the header nests deeper than {MAX_HEADER_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _lengths(header: dict, key: str, *, limit: int, item_limit: int, what: str) -> list[int]:
    values = header[key]
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise FrameError(f"reveal frame: '{key}' must be a list of integers, got {values!r:.80}")
    if not 1 <= len(values) <= limit:
        raise FrameError(f"reveal frame: '{key}' must list 1 to {limit} entries, got {len(values)}")
    bad = [v for v in values if not 0 < v <= item_limit]
    if bad:
        raise FrameError(f"reveal frame: each {what} in '{key}' must be in [1, {item_limit}], got {bad[0]}")
    return values


def _fields(cls, header: dict, payload_field: str, lengths_key: str) -> dict:
    """The dataclass's fields from the header, each checked against its annotation."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != payload_field}
    unknown = set(header) - set(fields) - {"frame", lengths_key}
    if unknown:
        raise FrameError(f"reveal frame: unknown header field(s) {sorted(unknown)} "
                         f"(allowed: {sorted(fields)})")
    out = {}
    for name, f in fields.items():
        if name not in header:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FrameError(f"reveal frame: header field '{name}' is required")
            continue
        _check(header[name], hints[name], name)
        out[name] = float(header[name]) if hints[name] is float else header[name]
    return out


def _check(value, hint, where: str) -> None:
    """Raise FrameError unless `value` (decoded JSON) has the annotated type."""
    origin = typing.get_origin(hint) or hint
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        if not isinstance(value, list):
            raise FrameError(f"reveal frame: '{where}' must be a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            _check(v, item, f"{where}[{i}]")
        return
    ok = {
        str: lambda v: isinstance(v, str),
        int: lambda v: type(v) is int,
        float: lambda v: type(v) in (int, float) and math.isfinite(v),
        bool: lambda v: type(v) is bool,
        dict: lambda v: isinstance(v, dict),
        typing.Any: lambda v: True,
    }.get(origin)
    if ok is None:
        raise TypeError(f"reveal frame: field '{where}' has type {hint}, which the frame codec does not carry")
    if not ok(value):
        name = getattr(origin, "__name__", str(origin))
        raise FrameError(f"reveal frame: '{where}' must be {name}, got {type(value).__name__} {value!r:.80}")
