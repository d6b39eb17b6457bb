"""SEAL's serialized Ciphertext, checked field by field before SEAL or TenSEAL parse it.

A serialized SEAL object is a 16-byte header (magic 0xA15E, header size 16, version, compression
mode, reserved zeros, total size) and a payload, here zstd-compressed. The payload of a Ciphertext is:
parms_id (4 × uint64), is_ntt_form (1 byte), size, poly_modulus_degree, coeff_modulus_size
(3 × uint64), scale (double), correction_factor (uint64), then the coefficients as a nested,
uncompressed SEAL object: header, count (uint64), count × uint64.

Checking the payload ourselves pins the ciphertext to the one level and scale its layout allows
(SEAL would accept any level of the chain and any scale) and bounds the decompression, since
libzstd refuses to write past the content size the frame declares, which must equal the size the
layout implies.
"""

import struct
from dataclasses import dataclass

import zstandard

from hetrain.core.errors import BundleError

MAGIC = b"\x5e\xa1"
HEADER_SIZE = 16
SEAL_MAJOR = 4
COMPRESSION = {0: "none", 2: "zstd"}  # what SEAL 4 writes; zlib (1) is never produced by TenSEAL
_META = struct.Struct("<4QB3QdQ")  # parms_id, is_ntt_form, size, N, coeff_modulus_size, scale, correction
_COUNT = struct.Struct("<Q")


@dataclass(frozen=True)
class CiphertextLayout:
    """What one kind of ciphertext must look like: ring degree, level (parms_id, primes) and scale."""

    name: str
    poly_modulus_degree: int
    parms_id: tuple[int, int, int, int]
    coeff_modulus_size: int
    scale: float

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def payload_size(self) -> int:
        """Bytes of the uncompressed payload of a two-polynomial ciphertext at this level."""
        return _META.size + HEADER_SIZE + _COUNT.size + 8 * self.coefficient_count

    @property
    def coefficient_count(self) -> int:
        return 2 * self.poly_modulus_degree * self.coeff_modulus_size


def _check_header(header: bytes, what: str, total: int, compression: tuple[int, ...]) -> int:
    """Validate a 16-byte SEAL header; return its compression mode."""
    if len(header) < HEADER_SIZE or header[:2] != MAGIC or header[2] != HEADER_SIZE:
        raise BundleError(f"ciphertext blob: {what} header is missing or malformed (needs magic 5ea1, size 16)")
    if header[3] != SEAL_MAJOR:
        raise BundleError(f"ciphertext blob: {what} has SEAL version {header[3]}.{header[4]}; allowed: {SEAL_MAJOR}.x")
    mode = header[5]
    if mode not in compression:
        allowed = ", ".join(f"{m} ({COMPRESSION[m]})" for m in compression)
        raise BundleError(f"ciphertext blob: {what} has compression mode {mode}; allowed: {allowed}")
    if header[6:8] != b"\0\0":
        raise BundleError(f"ciphertext blob: {what} header has non-zero reserved bytes {header[6:8].hex()}")
    declared = struct.unpack_from("<Q", header, 8)[0]
    if declared != total:
        raise BundleError(f"ciphertext blob: {what} header declares {declared} bytes but {total} are present")
    return mode


def _inflate(payload: bytes, expected: int) -> bytes:
    """Decompress exactly one zstd frame that must declare and hold `expected` bytes."""
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as exc:
        raise BundleError(f"ciphertext blob: the zstd frame header is malformed ({exc})") from None
    if declared != expected:
        raise BundleError(
            f"ciphertext blob: the compressed payload declares {declared} bytes; this layout needs exactly {expected}"
        )
    inflater = zstandard.ZstdDecompressor().decompressobj()
    try:  # libzstd refuses to write past the declared content size, so this is bounded
        body = inflater.decompress(payload)
    except zstandard.ZstdError as exc:
        raise BundleError(f"ciphertext blob: the compressed payload is corrupt ({exc})") from None
    if not inflater.eof or inflater.unused_data or len(body) != expected:
        raise BundleError(
            f"ciphertext blob: the compressed payload holds {len(body)} bytes"
            f"{' and trailing data' if inflater.unused_data else ''}; this layout needs one frame of {expected}"
        )
    return body


def _head(payload: bytes, mode: int) -> bytes:
    """The first bytes of the uncompressed payload (the metadata), read without inflating the rest."""
    if mode == 0:
        return payload[:_META.size]
    try:
        return zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False).read(_META.size)
    except zstandard.ZstdError as exc:
        raise BundleError(f"ciphertext blob: the compressed payload is corrupt ({exc})") from None


def _check_meta(head: bytes, layout: CiphertextLayout) -> None:
    if len(head) < _META.size:
        raise BundleError(f"ciphertext blob: the SEAL payload ends after {len(head)} bytes, inside its metadata")
    *parms_id, ntt, size, n, k, scale, correction = _META.unpack_from(head, 0)
    if n != layout.poly_modulus_degree:
        raise BundleError(
            f"ciphertext blob: poly_modulus_degree is {n}; layout '{layout.name}' needs {layout.poly_modulus_degree}"
        )
    if k != layout.coeff_modulus_size or tuple(parms_id) != layout.parms_id:
        raise BundleError(
            f"ciphertext blob: the ciphertext is at a level with {k} coefficient moduli (parms_id "
            f"{parms_id[0]:016x}…); layout '{layout.name}' needs {layout.coeff_modulus_size} "
            f"(parms_id {layout.parms_id[0]:016x}…)"
        )
    if size != 2:
        raise BundleError(f"ciphertext blob: the ciphertext has {size} polynomials; allowed: 2")
    if ntt != 1:
        raise BundleError(f"ciphertext blob: is_ntt_form is {ntt}; a CKKS ciphertext needs 1")
    if scale != layout.scale:
        raise BundleError(f"ciphertext blob: SEAL scale is {scale!r}; layout '{layout.name}' needs {layout.scale!r}")
    if correction != 1:
        raise BundleError(f"ciphertext blob: correction_factor is {correction}; CKKS needs 1")


def check_ciphertext(seal: bytes, layout: CiphertextLayout) -> None:
    """Raise BundleError unless `seal` is one well-formed ciphertext of `layout`'s degree, level and scale."""
    mode = _check_header(seal, "SEAL ciphertext", len(seal), tuple(COMPRESSION))
    payload = seal[HEADER_SIZE:]
    _check_meta(_head(payload, mode), layout)  # level and scale first: they name the likeliest mistake
    body = _inflate(payload, layout.payload_size) if mode == 2 else payload
    if len(body) != layout.payload_size:
        raise BundleError(
            f"ciphertext blob: the SEAL payload is {len(body)} bytes; layout '{layout.name}' needs {layout.payload_size}"
        )
    data = body[_META.size:]
    _check_header(data, "coefficient array", len(data), (0,))
    if data[3:5] != seal[3:5]:
        raise BundleError(f"ciphertext blob: the coefficient array has SEAL version {data[3]}.{data[4]}, the "
                          f"ciphertext {seal[3]}.{seal[4]}; both come from one SEAL")
    (count,) = _COUNT.unpack_from(data, HEADER_SIZE)
    if count != layout.coefficient_count:
        raise BundleError(
            f"ciphertext blob: the coefficient array declares {count} values; layout '{layout.name}' needs "
            f"{layout.coefficient_count}"
        )


def unpack(seal: bytes, limit: int = 64 << 20) -> bytes:
    """The uncompressed payload of a serialized SEAL object, at most `limit` bytes (tests edit it)."""
    if seal[5] == 0:
        return bytes(seal[HEADER_SIZE:])
    return zstandard.ZstdDecompressor().decompress(seal[HEADER_SIZE:], max_output_size=limit)


def repack(seal: bytes, payload: bytes, compression: int | None = None) -> bytes:
    """`payload` wrapped like `seal` (same version), zstd-compressed unless `compression` is 0."""
    mode = seal[5] if compression is None else compression
    body = zstandard.ZstdCompressor().compress(payload) if mode == 2 else payload
    header = bytearray(seal[:HEADER_SIZE])
    header[5] = mode
    struct.pack_into("<Q", header, 8, HEADER_SIZE + len(body))
    return bytes(header) + body
