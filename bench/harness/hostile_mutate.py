"""Edits of genuine artifacts: bit flips, truncation, extension and field edits of ciphertext blobs.

Shared by the hostile-input benchmark and tests/test_hostile_inputs.py, so both feed the loaders the
same kinds of damage.
"""

import struct

import zstandard

from hetrain.mpc_ops.crypto import seal_format, wire

# Offsets in the uncompressed SEAL ciphertext payload (see mpc_ops/seal_format.py)
SEAL_FIELDS = {"ntt": (32, "<B"), "polys": (33, "<Q"), "degree": (41, "<Q"), "moduli": (49, "<Q"),
               "seal_scale": (57, "<d"), "correction": (65, "<Q"), "coefficient_count": (89, "<Q")}
PROTO_FIELDS = ("size", "scale")  # the TenSEAL CKKSVector message's own fields
FIELDS = tuple(SEAL_FIELDS) + PROTO_FIELDS


def flip(data: bytes, bits: list[int]) -> bytes:
    """`data` with each listed bit (counted from the first byte's lowest bit) inverted."""
    out = bytearray(data)
    for bit in bits:
        out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def field_value(blob: bytes, field: str):
    """The current value of a field of a CKKSVector blob."""
    parts = wire.parse(blob, max_slots=1 << 20)
    if field in PROTO_FIELDS:
        return getattr(parts, field)
    offset, fmt = SEAL_FIELDS[field]
    return struct.unpack_from(fmt, seal_format.unpack(parts.seal_ciphertext), offset)[0]


def set_field(blob: bytes, field: str, value) -> bytes:
    """The blob with one protobuf or SEAL field set to `value` (the payload recompressed, sizes kept consistent)."""
    parts = wire.parse(blob, max_slots=1 << 20)
    if field in PROTO_FIELDS:
        changed = {"size": parts.size, "scale": parts.scale, field: value}
        return wire.build(wire.VectorBlob(changed["size"], parts.seal_ciphertext, changed["scale"]))
    offset, fmt = SEAL_FIELDS[field]
    payload = bytearray(seal_format.unpack(parts.seal_ciphertext))
    struct.pack_into(fmt, payload, offset, value)
    seal = seal_format.repack(parts.seal_ciphertext, bytes(payload))
    return wire.build(wire.VectorBlob(parts.size, seal, parts.scale))


def edit_payload(blob: bytes, edit, compression: int | None = None) -> bytes:
    """The blob with its uncompressed SEAL payload passed through `edit` and packed again."""
    parts = wire.parse(blob, max_slots=1 << 20)
    payload = edit(seal_format.unpack(parts.seal_ciphertext))
    seal = seal_format.repack(parts.seal_ciphertext, payload, compression)
    return wire.build(wire.VectorBlob(parts.size, seal, parts.scale))


def with_seal(blob: bytes, seal: bytes) -> bytes:
    parts = wire.parse(blob, max_slots=1 << 20)
    return wire.build(wire.VectorBlob(parts.size, seal, parts.scale))


def zstd_bomb(blob: bytes) -> bytes:
    """The blob whose zstd frame declares 4 GiB of content (a decompression bomb's header)."""
    parts = wire.parse(blob, max_slots=1 << 20)
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(
        seal_format.unpack(parts.seal_ciphertext)))
    fcs_size = {0: 1 if frame[4] & 0x20 else 0, 1: 2, 2: 4, 3: 8}[frame[4] >> 6]
    end = zstandard.frame_header_size(bytes(frame))
    frame[end - fcs_size:end] = b"\xff" * fcs_size
    header = bytearray(parts.seal_ciphertext[:16])
    struct.pack_into("<Q", header, 8, 16 + len(frame))
    return with_seal(blob, bytes(header) + bytes(frame))


def trailing_frame(blob: bytes) -> bytes:
    """The blob with a second zstd frame after the first (the SEAL header size adjusted)."""
    parts = wire.parse(blob, max_slots=1 << 20)
    seal = bytearray(parts.seal_ciphertext + zstandard.ZstdCompressor().compress(b"more"))
    struct.pack_into("<Q", seal, 8, len(seal))
    return with_seal(blob, bytes(seal))
