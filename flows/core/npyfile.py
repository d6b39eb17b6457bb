"""Strict readers of .npy and .npz bytes: numpy allocates nothing before the header is checked.

np.load trusts the header: a shape of 2^40 elements in a 100-byte file makes it allocate
first and fail later, and an npz member may be compressed without limit. These readers take
only uncompressed members and plain numeric arrays whose declared shape matches their bytes.
"""

import io
import tokenize
import zipfile
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 10_000
MAX_MEMBERS = 4096
NUMERIC = "biuf"  # bool, signed and unsigned integers, floats


def read_npy(data: bytes, what: str, error: type[Exception], kinds: str = NUMERIC) -> np.ndarray:
    """Parse .npy bytes into an array of one of `kinds`; raise `error` naming what is wrong."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]}; allowed: 1.0, 2.0")
    except (ValueError, EOFError, TypeError, SyntaxError, tokenize.TokenError) as exc:  # numpy tokenizes the header
        raise error(f"{what}: not a valid .npy array ({str(exc)[:200]})") from None
    if dtype.kind not in kinds or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise error(f"{what}: dtype {dtype} is not allowed (allowed kinds: {kinds!r}, no records or objects)")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    body = len(data) - buf.tell()
    if count * dtype.itemsize != body:
        raise error(f"{what}: header declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) but "
                    f"{body} bytes follow")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()


def read_npz(path: Path, what: str, error: type[Exception], limit: int, kinds: str = NUMERIC) -> dict[str, np.ndarray]:
    """Read an uncompressed .npz of at most `limit` bytes with read_npy's checks on every member."""
    try:
        if Path(path).stat().st_size > limit:
            raise error(f"{what}: {Path(path).stat().st_size} bytes, over the limit of {limit}")
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            names = [m.filename for m in members]
            if len(members) > MAX_MEMBERS or len(set(names)) != len(names):
                raise error(f"{what}: {len(members)} members ({len(set(names))} distinct); allowed: at most "
                            f"{MAX_MEMBERS}, no duplicates")
            out = {}
            for member in members:
                if member.compress_type != zipfile.ZIP_STORED or not member.filename.endswith(".npy") \
                        or member.file_size > limit:
                    raise error(f"{what}: member {member.filename!r:.80} is compressed, not .npy or over {limit} "
                                f"bytes; only stored .npy members are allowed")
                out[member.filename[:-4]] = read_npy(archive.read(member), f"{what} member {member.filename!r:.80}",
                                                     error, kinds)
            return out
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"{what}: not a readable .npz archive ({str(exc)[:200] or type(exc).__name__})") from None
