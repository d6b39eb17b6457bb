"""The CKKSVector wire format: parse/build round trips, logical resizing, and strict rejection of odd blobs."""

import struct

import numpy as np
import pytest
import tenseal as ts
import zstandard

from hetrain.mpc_ops.crypto import ckks, seal_format, wire
from hetrain.core.errors import BundleError

pytestmark = pytest.mark.integration  # TenSEAL contexts

SLOTS = 4096
SUM_ATOL = 1e-6  # CKKS error of log2(seg) rotations at scale 2^50 is ~2^-30; 1e-6 leaves ~1000x margin


@pytest.fixture(scope="module")
def private_context() -> ts.Context:
    """A test-only private context (tests may decrypt; library code outside the key holder may not)."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 50, 60])
    context.global_scale = 2.0**50
    context.generate_galois_keys()
    return context


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    return np.random.default_rng(0).uniform(-2.0, 2.0, SLOTS)


@pytest.fixture(scope="module")
def blob(private_context, values) -> bytes:
    return ts.ckks_vector(private_context, values.tolist()).serialize()


def test_parse_reads_size_scale_and_seal_header_of_a_real_ckks_vector(blob):
    # Execute
    parts = wire.parse(blob, max_slots=SLOTS)

    # Assert
    assert parts.size == SLOTS
    assert parts.scale == 2.0**50
    assert parts.seal_ciphertext[:2] == wire.SEAL_MAGIC
    assert struct.unpack_from("<Q", parts.seal_ciphertext, 8)[0] == len(parts.seal_ciphertext)


def test_build_of_parsed_parts_reproduces_the_blob_byte_for_byte(blob):
    # Execute
    rebuilt = wire.build(wire.parse(blob, max_slots=SLOTS))

    # Assert
    assert rebuilt == blob


def test_with_size_changes_only_the_logical_size(private_context, blob, values):
    # Prepare
    before = bytes(blob)

    # Execute
    resized = wire.with_size(blob, 100, max_slots=SLOTS)

    # Assert: same ciphertext and scale, TenSEAL sees 100 values, the input blob is untouched
    old, new = wire.parse(blob, max_slots=SLOTS), wire.parse(resized, max_slots=SLOTS)
    assert new.size == 100
    assert (new.seal_ciphertext, new.scale) == (old.seal_ciphertext, old.scale)
    vector = ts.ckks_vector_from(private_context, resized)
    assert vector.size() == 100
    np.testing.assert_allclose(vector.decrypt(), values[:100], atol=SUM_ATOL)
    assert blob == before


@pytest.mark.parametrize("seg", [4, 32, 128])
def test_tenseal_sum_on_a_resized_vector_sums_every_segment_into_its_first_slot(private_context, blob, values, seg):
    # Prepare
    resized = ts.ckks_vector_from(private_context, wire.with_size(blob, seg, max_slots=SLOTS))

    # Execute
    summed = resized.sum()
    full = ts.ckks_vector_from(private_context, wire.with_size(summed.serialize(), SLOTS, max_slots=SLOTS))
    got = np.asarray(full.decrypt())[::seg]

    # Assert
    np.testing.assert_allclose(got, values.reshape(-1, seg).sum(axis=1), rtol=0, atol=SUM_ATOL)


def _reordered(blob: bytes) -> bytes:
    """The same three fields with the ciphertext (field 2) written before the size (field 1)."""
    parts = wire.parse(blob, max_slots=SLOTS)
    good = wire.build(parts)
    size_field_len = 2 + good[1]
    size_field, rest = good[:size_field_len], good[size_field_len:]
    seal_field, scale_field = rest[:-9], rest[-9:]
    return seal_field + size_field + scale_field


def _with_seal(blob: bytes, seal: bytes) -> bytes:
    parts = wire.parse(blob, max_slots=SLOTS)
    return wire.build(wire.VectorBlob(size=parts.size, seal_ciphertext=seal, scale=parts.scale))


def _with(blob: bytes, **changes) -> bytes:
    parts = wire.parse(blob, max_slots=SLOTS)
    fields = {"size": parts.size, "seal_ciphertext": parts.seal_ciphertext, "scale": parts.scale, **changes}
    return wire.build(wire.VectorBlob(**fields))


MALFORMED = {
    "shorter than 32 bytes": (lambda b: b[:20], r"expected at least 32 bytes, got 20"),
    "truncated scale": (lambda b: b[:-5], r"field 3 runs past the end of the blob"),
    "truncated ciphertext": (lambda b: b[: len(b) // 2], r"field 2 runs past the end of the blob"),
    "wrong field order": (_reordered, r"expected field 1 with wire type 2, got field 2 with wire type 2"),
    "trailing bytes": (lambda b: b + b"\x00\x00\x00", r"3 trailing bytes after the scale"),
    "bad SEAL magic": (lambda b: _with_seal(b, b"\x00\x00" + wire.parse(b, max_slots=SLOTS).seal_ciphertext[2:]),
                       r"SEAL ciphertext header is missing or malformed"),
    "SEAL size mismatch": (lambda b: _with_seal(b, wire.parse(b, max_slots=SLOTS).seal_ciphertext[:-1]),
                           r"SEAL header declares \d+ bytes but \d+ are present"),
    "size 0": (lambda b: _with(b, size=0), r"logical size must be in \[1, 4096\], got 0"),
    "size above slots": (lambda b: _with(b, size=SLOTS + 1), r"logical size must be in \[1, 4096\], got 4097"),
    "huge scale": (lambda b: _with(b, scale=2.0**121), r"scale must be in \[2\^10, 2\^120\], got 2\.6"),
    "NaN scale": (lambda b: _with(b, scale=float("nan")), r"scale must be in \[2\^10, 2\^120\], got nan"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_parse_refuses_a_malformed_blob_with_a_message_naming_the_problem(blob, case):
    # Prepare
    mutate, message = MALFORMED[case]
    bad = mutate(blob)

    # Execute / Assert
    with pytest.raises(BundleError, match=message):
        wire.parse(bad, max_slots=SLOTS)


@pytest.mark.parametrize("size", [0, SLOTS + 1])
def test_with_size_refuses_a_size_outside_the_slot_range(blob, size):
    # Execute / Assert
    with pytest.raises(BundleError, match=rf"logical size must be in \[1, {SLOTS}\], got {size}"):
        wire.with_size(blob, size, max_slots=SLOTS)


def test_parse_refuses_a_blob_whose_size_exceeds_a_smaller_slot_count(blob):
    # Execute / Assert: a 4096-slot vector is too big for a 2048-slot context
    with pytest.raises(BundleError, match=r"logical size must be in \[1, 2048\], got 4096"):
        wire.parse(blob, max_slots=2048)


# ---- level, scale and SEAL payload checks (wire.check) ------------------------------------------

META = {"ntt": (32, "<B"), "polys": (33, "<Q"), "degree": (41, "<Q"), "moduli": (49, "<Q"), "scale": (57, "<d"),
        "correction": (65, "<Q"), "count": (89, "<Q")}


@pytest.fixture(scope="module")
def layouts(private_context):
    return ckks.fresh_layout(private_context), ckks.product_layout(private_context)


@pytest.fixture(scope="module")
def product(private_context, blob, layouts):
    return ckks.multiply_plain(ckks.load_vector(private_context, blob, layouts[0]), np.ones(SLOTS)).serialize()


def _edit_payload(blob: bytes, edit, compression=None) -> bytes:
    """The blob with its uncompressed SEAL payload passed through `edit` and packed again."""
    parts = wire.parse(blob, max_slots=SLOTS)
    payload = bytearray(seal_format.unpack(parts.seal_ciphertext))
    payload = edit(payload)
    seal = seal_format.repack(parts.seal_ciphertext, bytes(payload), compression)
    return wire.build(wire.VectorBlob(parts.size, seal, parts.scale))


def _set(field: str, value):
    offset, fmt = META[field]

    def edit(payload):
        struct.pack_into(fmt, payload, offset, value)
        return payload
    return edit


def test_layouts_measure_the_fresh_and_the_product_level_of_the_default_chain(blob, product, layouts):
    # Prepare
    fresh, after_product = layouts

    # Execute
    fresh_meta = struct.unpack_from("<4QB3QdQ", seal_format.unpack(wire.parse(blob, max_slots=SLOTS).seal_ciphertext))
    product_meta = struct.unpack_from("<4QB3QdQ", seal_format.unpack(wire.parse(product, max_slots=SLOTS).seal_ciphertext))

    # Assert: [60, 50, 60]: an owner's ciphertext holds 2 primes, after ct × plain and rescale 1; scale stays 2^50
    assert (fresh.coeff_modulus_size, after_product.coeff_modulus_size) == (2, 1)
    assert fresh_meta[:4] == fresh.parms_id and product_meta[:4] == after_product.parms_id
    assert fresh_meta[4:9] == (1, 2, 8192, 2, 2.0**50) and product_meta[4:9] == (1, 2, 8192, 1, 2.0**50)
    wire.check(blob, fresh)
    wire.check(product, after_product)


def test_check_refuses_a_product_where_a_fresh_ciphertext_is_expected_and_vice_versa(blob, product, layouts):
    # Execute / Assert
    with pytest.raises(BundleError, match=r"at a level with 1 coefficient moduli .*layout 'fresh' needs 2"):
        wire.check(product, layouts[0])
    with pytest.raises(BundleError, match=r"at a level with 2 coefficient moduli .*layout 'product' needs 1"):
        wire.check(blob, layouts[1])


SEAL_MALFORMED = {
    "parms_id of another level": (lambda b: _edit_payload(b, _set("moduli", 1)), r"at a level with 1 coefficient moduli"),
    "degree": (lambda b: _edit_payload(b, _set("degree", 4096)), r"poly_modulus_degree is 4096; layout 'fresh' needs 8192"),
    "three polynomials": (lambda b: _edit_payload(b, _set("polys", 3)), r"has 3 polynomials; allowed: 2"),
    "ntt flag 2": (lambda b: _edit_payload(b, _set("ntt", 2)), r"is_ntt_form is 2; a CKKS ciphertext needs 1"),
    "ntt flag 0": (lambda b: _edit_payload(b, _set("ntt", 0)), r"is_ntt_form is 0"),
    "SEAL scale": (lambda b: _edit_payload(b, _set("scale", 2.0**40)), r"SEAL scale is 1099511627776\.0; layout 'fresh' needs 1125899906842624\.0"),
    "NaN SEAL scale": (lambda b: _edit_payload(b, _set("scale", float("nan"))), r"SEAL scale is nan"),
    "correction factor": (lambda b: _edit_payload(b, _set("correction", 7)), r"correction_factor is 7; CKKS needs 1"),
    "coefficient count": (lambda b: _edit_payload(b, _set("count", 2**62)), r"coefficient array declares 4611686018427387904 values; layout 'fresh' needs 32768"),
    "payload extended": (lambda b: _edit_payload(b, lambda p: p + b"\0" * 8), r"payload declares 262249 bytes; this layout needs exactly 262241"),
    "payload truncated": (lambda b: _edit_payload(b, lambda p: p[:1000]), r"payload declares 1000 bytes; this layout needs exactly 262241"),
    "uncompressed payload extended": (lambda b: _edit_payload(b, lambda p: p + b"\0", compression=0), r"SEAL payload is 262242 bytes; layout 'fresh' needs 262241"),
    "zlib compression": (lambda b: _edit_payload(b, lambda p: p, compression=1), r"compression mode 1; allowed: 0 \(none\), 2 \(zstd\)"),
    "SEAL major version": (lambda b: _with_seal(b, _header_byte(b, 3, 3)), r"SEAL version 3\.\d+; allowed: 4\.x"),
    "reserved bytes": (lambda b: _with_seal(b, _header_byte(b, 6, 1)), r"non-zero reserved bytes 0100"),
    "corrupt zstd block header": (lambda b: _with_seal(b, _break_block(wire.parse(b, max_slots=SLOTS).seal_ciphertext)),
                                  r"compressed payload is corrupt"),
    "second zstd frame": (lambda b: _with_seal(b, _append_frame(wire.parse(b, max_slots=SLOTS).seal_ciphertext)), r"and trailing data"),
    "TenSEAL scale": (lambda b: _with(b, scale=2.0**40), r"TenSEAL scale is 1099511627776\.0; layout 'fresh' needs 1125899906842624\.0"),
    "logical size below the slots": (lambda b: _with(b, size=4064), r"logical size is 4064; layout 'fresh' needs all 4096 slots"),
    "SEAL minor version differs": (lambda b: _with_seal(b, _header_byte(b, 4, 9)), r"coefficient array has SEAL version 4\.\d+, the ciphertext 4\.9"),
    "oversized blob": (lambda b: b + b"\0" * 300_000, r"ciphertext blob: 551\d+ bytes, over the limit of 528578 for layout 'fresh'"),
}


def _header_byte(blob: bytes, index: int, value: int) -> bytes:
    seal = bytearray(wire.parse(blob, max_slots=SLOTS).seal_ciphertext)
    seal[index] = value
    return bytes(seal)


def _break_block(seal: bytes) -> bytes:
    """The first zstd block header set to the reserved block type (zstd has no checksum in SEAL's frames)."""
    out = bytearray(seal)
    out[16 + zstandard.frame_header_size(seal[16:])] = 0xFF
    return bytes(out)


def _append_frame(seal: bytes) -> bytes:
    extra = zstandard.ZstdCompressor().compress(b"more")
    out = bytearray(seal + extra)
    struct.pack_into("<Q", out, 8, len(out))
    return bytes(out)


@pytest.mark.parametrize("case", sorted(SEAL_MALFORMED))
def test_check_refuses_a_seal_payload_of_the_wrong_shape_level_or_scale(blob, layouts, case):
    # Prepare
    mutate, message = SEAL_MALFORMED[case]
    bad = mutate(blob)

    # Execute / Assert
    with pytest.raises(BundleError, match=message):
        wire.check(bad, layouts[0])


def test_load_vector_turns_tenseals_own_refusal_into_a_bundle_error(private_context, blob, layouts):
    # Prepare: structurally perfect, but one coefficient is 2^64 - 1, above every prime (SEAL checks that)
    bad = _edit_payload(blob, lambda p: p[:-8] + b"\xff" * 8)
    wire.check(bad, layouts[0])

    # Execute / Assert
    with pytest.raises(BundleError, match=r"ciphertext blob: TenSEAL refused it \(ciphertext data is invalid\)"):
        ckks.load_vector(private_context, bad, layouts[0])
