"""The reveal frame: request and response round trips, new dataclass fields passing through, and
strict refusal of every malformed frame with a FrameError naming what is wrong."""

import copy
import dataclasses
import json
import struct

import numpy as np
import pytest

from hetrain.mpc_ops.reveal import frame as reveal_wire
from hetrain.core.errors import BundleError, FrameError
from hetrain.mpc_ops.reveal.protocol import RevealRequest, RevealResponse

LIMITS = {"max_blobs": 4, "max_blob_bytes": 64}


def make_request(**changes) -> RevealRequest:
    request = RevealRequest(
        request_id="r-1", key_id="k-abc", kind="activation", layer="enc1", round=3,
        blobs=[b"\x01" * 40, b"\x02" * 17], stride=[32, 32], counts=[4, 2], aggregate=30,
        rows=["00ab", "00cd"], weights="ef" * 32,
    )
    return dataclasses.replace(request, **changes)


def make_response(**changes) -> RevealResponse:
    response = RevealResponse(request_id="r-1", values=[np.array([0.5, -1.25, 1e-300, 3.0]), np.array([7.75, -0.0])],
                              sigma=0.2165, decryptions_used=12)
    return dataclasses.replace(response, **changes)


def frame(header: dict, payload: bytes = b"") -> bytes:
    """A frame with a hand-written header (for the refusal cases)."""
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + payload


def request_header(**changes) -> dict:
    header = {"frame": reveal_wire.REQUEST_FRAME, "request_id": "r-1", "key_id": "k-abc", "kind": "activation",
              "layer": "enc1", "round": 3, "stride": [32], "counts": [4], "aggregate": 30, "blob_lengths": [8]}
    header.update(changes)
    return header


# ---- round trips ------------------------------------------------------------------------------


def test_request_round_trips_every_field_and_blob_and_leaves_the_request_unchanged():
    # Prepare
    request = make_request()
    before = copy.deepcopy(request)

    # Execute
    decoded = reveal_wire.decode_request(reveal_wire.encode_request(request), **LIMITS)

    # Assert
    assert decoded == request
    assert request == before


def test_request_frame_is_a_big_endian_header_length_a_json_header_and_the_blobs():
    # Execute
    body = reveal_wire.encode_request(make_request())

    # Assert
    (n,) = struct.unpack(">I", body[:4])
    header = json.loads(body[4 : 4 + n])
    assert header["frame"] == "reveal-request/1" and header["blob_lengths"] == [40, 17]
    assert "blobs" not in header
    assert body[4 + n :] == b"\x01" * 40 + b"\x02" * 17


def test_numpy_integers_in_a_request_are_written_as_json_numbers():
    # Prepare: the layers build counts and aggregates from numpy arithmetic
    request = make_request(counts=[np.int64(4), np.int64(2)], aggregate=np.int64(30))

    # Execute
    decoded = reveal_wire.decode_request(reveal_wire.encode_request(request), **LIMITS)

    # Assert
    assert decoded.counts == [4, 2] and type(decoded.aggregate) is int


def test_response_round_trips_float64_values_exactly():
    # Prepare
    response = make_response()

    # Execute
    decoded = reveal_wire.decode_response(reveal_wire.encode_response(response), request=make_request())

    # Assert
    assert (decoded.request_id, decoded.sigma, decoded.decryptions_used, decoded.extra) == ("r-1", 0.2165, 12, {})
    for got, want in zip(decoded.values, response.values, strict=True):
        assert got.dtype == np.float64 and got.tobytes() == want.tobytes()


def test_a_field_added_to_the_request_dataclass_passes_through_without_codec_changes(monkeypatch):
    # Prepare
    @dataclasses.dataclass
    class Extended(RevealRequest):
        priority: int = 0
        tags: list[str] = dataclasses.field(default_factory=list)

    monkeypatch.setattr(reveal_wire, "RevealRequest", Extended)
    request = Extended(**dataclasses.asdict(make_request()), priority=2, tags=["a", "b"])

    # Execute
    decoded = reveal_wire.decode_request(reveal_wire.encode_request(request), **LIMITS)

    # Assert
    assert (decoded.priority, decoded.tags, decoded.blobs) == (2, ["a", "b"], request.blobs)


# ---- malformed requests -------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    (b"\x00\x00", r"2 bytes is shorter than the 4-byte header length"),
    (struct.pack(">I", 50) + b"{}", r"header length 50 runs past the end of the 6-byte frame"),
    (struct.pack(">I", (1 << 20) + 1) + b"x" * 10, r"header length 1048577 is over the limit of 1048576 bytes"),
    (struct.pack(">I", 3) + b"\xff\xfe{", r"the header is not UTF-8 JSON"),
    (struct.pack(">I", 5) + b"[1,2]", r"the header must be a JSON object, got list"),
    (frame({**request_header(), "frame": "reveal-response/1"}, b"x" * 8), r"'frame' must be 'reveal-request/1'"),
    (frame({k: v for k, v in request_header().items() if k != "layer"}, b"x" * 8), r"header field 'layer' is required"),
    (frame(request_header(debug=True), b"x" * 8), r"unknown header field\(s\) \['debug'\] \(allowed: \['aggregate'"),
    (frame(request_header(round="3"), b"x" * 8), r"'round' must be int, got str '3'"),
    (frame(request_header(aggregate=30.0), b"x" * 8), r"'aggregate' must be int, got float 30.0"),
    (frame(request_header(stride=[True]), b"x" * 8), r"'stride\[0\]' must be int, got bool True"),
    (frame(request_header(counts=4), b"x" * 8), r"'counts' must be a list, got int"),
    (frame(request_header(blob_lengths=["8"]), b"x" * 8), r"'blob_lengths' must be a list of integers"),
    (frame(request_header(blob_lengths=[8]), b"x" * 9), r"blob_lengths add up to 8 bytes, but the payload holds 9"),
    (frame(request_header(blob_lengths=[0, 8]), b"x" * 8), r"each blob in 'blob_lengths' must be in \[1, 64\], got 0"),
    (frame(request_header(blob_lengths=[65]), b"x" * 65), r"each blob in 'blob_lengths' must be in \[1, 64\], got 65"),
    (frame(request_header(blob_lengths=[1] * 5), b"x" * 5), r"'blob_lengths' must list 1 to 4 entries, got 5"),
    (frame(request_header(blob_lengths=[]), b""), r"'blob_lengths' must list 1 to 4 entries, got 0"),
    (frame({k: v for k, v in request_header().items() if k != "blob_lengths"}, b"x" * 8),
     r"header field 'blob_lengths' is required"),
    (struct.pack(">I", 14) + b'{"round": NaN}', r"the header is not UTF-8 JSON \(NaN is not allowed"),
], ids=["short", "header-past-end", "header-too-long", "not-utf8", "not-object", "wrong-frame", "missing-field",
        "unknown-field", "str-for-int", "float-for-int", "bool-for-int", "scalar-for-list", "bad-lengths",
        "payload-longer", "empty-blob", "blob-too-large", "too-many-blobs", "no-blobs", "no-lengths", "nan"])
def test_malformed_request_frame_is_refused_naming_the_problem(body, message):
    # Execute / Assert
    with pytest.raises(FrameError, match=r"^reveal frame: " + message):
        reveal_wire.decode_request(body, **LIMITS)


def nested_frame(depth: int) -> bytes:
    """A request frame whose header carries one field nested `depth` lists deep."""
    head = json.dumps(request_header(blob_lengths=[8]))[:-1] + ', "rows": ' + "[" * depth + "]" * depth + "}"
    return struct.pack(">I", len(head)) + head.encode() + b"x" * 8


@pytest.mark.parametrize("depth", [9, 100_000], ids=["just-too-deep", "past-the-recursion-limit"])
def test_deeply_nested_header_is_refused_with_a_frame_error_not_a_recursion_error(depth):
    # Execute / Assert: a FrameError (400 in the service), never RecursionError (500 with a traceback)
    with pytest.raises(FrameError, match=r"^reveal frame: the header nests deeper than 8 levels$"):
        reveal_wire.decode_request(nested_frame(depth), **LIMITS)


@pytest.mark.parametrize("name, value", [
    ("layer", "enc1\n2026-01-01 key-holder INFO reveal forged"), ("layer", "enc1\x1b[2K"), ("layer", "x" * 65),
    ("layer", "enc 1"), ("kind", "gradient\r"), ("request_id", "r-1\nforged"), ("key_id", "k abc"),
])
def test_logged_string_fields_must_be_short_identifiers(name, value):
    # Prepare
    body = reveal_wire.encode_request(make_request(**{name: value}))
    pattern = reveal_wire.IDENTIFIER if name in ("layer", "kind") else reveal_wire.TOKEN

    # Execute / Assert
    with pytest.raises(FrameError, match=rf"^reveal frame: '{name}' must match ") as exc:
        reveal_wire.decode_request(body, **LIMITS)
    assert pattern.pattern in str(exc.value) and "\n" not in str(exc.value)


def test_frame_errors_are_bundle_errors_so_callers_treat_them_as_bad_input():
    assert issubclass(FrameError, BundleError)


def test_decode_refuses_a_body_that_is_not_bytes():
    with pytest.raises(FrameError, match=r"expected bytes, got str"):
        reveal_wire.decode_request("not bytes", **LIMITS)


# ---- malformed responses ------------------------------------------------------------------------


def test_response_to_another_request_is_refused():
    # Prepare
    body = reveal_wire.encode_response(make_response(request_id="r-2"))

    # Execute / Assert
    with pytest.raises(FrameError, match=r"the response answers request 'r-2', not 'r-1'"):
        reveal_wire.decode_response(body, request=make_request())


def test_response_with_other_value_counts_than_requested_is_refused():
    # Prepare
    body = reveal_wire.encode_response(make_response(values=[np.zeros(4), np.zeros(1)]))

    # Execute / Assert
    with pytest.raises(FrameError, match=r"holds \[4, 1\] values per ciphertext, the request asked for \[4, 2\]"):
        reveal_wire.decode_response(body, request=make_request())


def test_response_with_non_finite_values_is_refused():
    # Prepare
    body = reveal_wire.encode_response(make_response(values=[np.array([0.0, np.inf, 1.0, 2.0]), np.zeros(2)]))

    # Execute / Assert
    with pytest.raises(FrameError, match=r"non-finite values"):
        reveal_wire.decode_response(body, request=make_request())


def test_response_whose_payload_is_cut_short_is_refused():
    # Prepare
    body = reveal_wire.encode_response(make_response())[:-8]

    # Execute / Assert
    with pytest.raises(FrameError, match=r"6 float64 values need 48 payload bytes, got 40"):
        reveal_wire.decode_response(body, request=make_request())


def test_max_request_bytes_covers_the_largest_frame_the_limits_allow():
    # Prepare
    request = make_request(blobs=[b"\x07" * 64] * 4, stride=[1] * 4, counts=[1] * 4)

    # Execute
    size = len(reveal_wire.encode_request(request))

    # Assert
    assert size <= reveal_wire.max_request_bytes(4, 64)
