"""The byte format of a serialized TenSEAL CKKSVector, parsed strictly before TenSEAL sees it.

A CKKSVector serializes as a three-field protobuf message:
field 1 (bytes) holds the logical size as one varint, field 2 (bytes) the SEAL ciphertext,
field 3 (fixed64) the scale as a double. Parsing it ourselves lets us (a) validate a blob's
structure before deserializing it and (b) change the logical size, which is how
`segment_sum` gets TenSEAL's power-of-two rotate-and-sum to act within slot segments.
"""

import struct
from dataclasses import dataclass

from hetrain.core.errors import BundleError
from hetrain.mpc_ops.crypto.seal_format import CiphertextLayout, check_ciphertext

SEAL_MAGIC = b"\x5e\xa1"
SEAL_HEADER_SIZE = 16


@dataclass(frozen=True)
class VectorBlob:
    """The three parts of a serialized CKKSVector."""

    size: int
    seal_ciphertext: bytes
    scale: float


def _read_varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BundleError(f"ciphertext blob: truncated or overlong varint in {what}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def parse(blob: bytes, *, max_slots: int) -> VectorBlob:
    """Parse and structurally validate a CKKSVector blob; raise BundleError on anything odd."""
    if not isinstance(blob, (bytes, bytearray)):
        raise BundleError(f"ciphertext blob: expected bytes, got {type(blob).__name__}")
    if len(blob) < 32:
        raise BundleError(f"ciphertext blob: expected at least 32 bytes, got {len(blob)}")
    fields: dict[int, bytes] = {}
    pos = 0
    for expected_field, expected_type in ((1, 2), (2, 2), (3, 1)):
        key, pos = _read_varint(blob, pos, "field key")
        field, wire_type = key >> 3, key & 7
        if (field, wire_type) != (expected_field, expected_type):
            raise BundleError(
                f"ciphertext blob: expected field {expected_field} with wire type {expected_type}, "
                f"got field {field} with wire type {wire_type}"
            )
        if wire_type == 2:
            length, pos = _read_varint(blob, pos, f"field {field} length")
        else:
            length = 8
        if pos + length > len(blob):
            raise BundleError(f"ciphertext blob: field {field} runs past the end of the blob")
        fields[field] = bytes(blob[pos : pos + length])
        pos += length
    if pos != len(blob):
        raise BundleError(f"ciphertext blob: {len(blob) - pos} trailing bytes after the scale")
    size, end = _read_varint(fields[1], 0, "size")
    if end != len(fields[1]) or not 1 <= size <= max_slots:
        raise BundleError(f"ciphertext blob: logical size must be in [1, {max_slots}], got {size}")
    seal = fields[2]
    if len(seal) < SEAL_HEADER_SIZE or seal[:2] != SEAL_MAGIC or seal[2] != SEAL_HEADER_SIZE:
        raise BundleError("ciphertext blob: the SEAL ciphertext header is missing or malformed")
    declared = struct.unpack_from("<Q", seal, 8)[0]
    if declared != len(seal):
        raise BundleError(
            f"ciphertext blob: SEAL header declares {declared} bytes but {len(seal)} are present"
        )
    (scale,) = struct.unpack("<d", fields[3])
    if not (2.0**10 <= scale <= 2.0**120):
        raise BundleError(f"ciphertext blob: scale must be in [2^10, 2^120], got {scale!r}")
    return VectorBlob(size=size, seal_ciphertext=seal, scale=scale)


def check_any(blob: bytes, layouts: list[CiphertextLayout]) -> VectorBlob:
    """`check` against each allowed layout in turn; raise the first layout's refusal if none fits."""
    first = None
    for layout in layouts:
        try:
            return check(blob, layout)
        except BundleError as exc:
            first = first or exc
    raise first


def check(blob: bytes, layout: CiphertextLayout) -> VectorBlob:
    """Parse a blob and check that it is one ciphertext of `layout` (degree, level, scale), before TenSEAL sees it."""
    limit = 2 * layout.payload_size + 4096  # zstd never grows random coefficients by more than a few bytes
    if isinstance(blob, (bytes, bytearray)) and len(blob) > limit:
        raise BundleError(f"ciphertext blob: {len(blob)} bytes, over the limit of {limit} for layout '{layout.name}'")
    parts = parse(blob, max_slots=layout.slots)
    if parts.size != layout.slots:  # every hetrain vector is a full slot vector; a reveal names its slots
        raise BundleError(f"ciphertext blob: logical size is {parts.size}; layout '{layout.name}' needs all "
                          f"{layout.slots} slots")
    if parts.scale != layout.scale:
        raise BundleError(
            f"ciphertext blob: TenSEAL scale is {parts.scale!r}; layout '{layout.name}' needs {layout.scale!r}"
        )
    check_ciphertext(parts.seal_ciphertext, layout)
    return parts


def build(parts: VectorBlob) -> bytes:
    """Serialize the three parts back into a CKKSVector blob."""
    size = _varint(parts.size)
    seal = parts.seal_ciphertext
    return (
        b"\x0a" + _varint(len(size)) + size
        + b"\x12" + _varint(len(seal)) + seal
        + b"\x19" + struct.pack("<d", parts.scale)
    )


def with_size(blob: bytes, size: int, *, max_slots: int) -> bytes:
    """Return the same ciphertext with a different logical size (1..max_slots)."""
    parts = parse(blob, max_slots=max_slots)
    if not 1 <= size <= max_slots:
        raise BundleError(f"logical size must be in [1, {max_slots}], got {size}")
    return build(VectorBlob(size=size, seal_ciphertext=parts.seal_ciphertext, scale=parts.scale))
