"""A data owner's plaintext table: load and validate, split, align, standardise, batch."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hetrain.core.errors import AlignmentError, ConfigError, SchemaError

_MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "null", "none"})
_EXAMPLES = 5


def load_table(path: Path, *, owner: str, id_column: str, feature_columns: list[str],
               label_column: str | None) -> pd.DataFrame:
    """Read one owner's CSV/Parquet table and validate it against the declared schema.

    Returns the ID column (stripped strings), the declared features as float64 and the
    label as int64 (if declared), in file order; extra columns are dropped.
    Raises SchemaError naming owner, file, column, line and the offending value.
    """
    path = Path(path)
    where = f"owner '{owner}', file '{path}'"
    declared = [id_column, *feature_columns] + ([label_column] if label_column else [])
    repeated = sorted({c for c in declared if declared.count(c) > 1})
    if repeated:
        raise SchemaError(f"{where}: columns {repeated} are declared more than once; "
                          f"the ID, feature and label columns must be distinct")
    raw, locate = _read_raw(path, where)
    missing = [c for c in declared if c not in raw.columns]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing}; the schema needs "
                          f"{declared}, the file has {list(raw.columns)}")
    if len(raw) == 0:
        raise SchemaError(f"{where}: the table has no data rows; at least one is needed "
                          f"(got a header only: {list(raw.columns)})")
    ids = _read_ids(raw[id_column], where, id_column, locate)
    out = {id_column: ids}
    for column in feature_columns:
        out[column] = _read_floats(raw[column], where, column, locate)
    if label_column:
        out[label_column] = _read_labels(raw[label_column], where, label_column, locate)
    return pd.DataFrame(out, columns=declared)


def _read_raw(path: Path, where: str) -> tuple[pd.DataFrame, Callable[[int], str]]:
    """Return the raw table and a function mapping a 0-based row to its place in the file."""
    if not path.is_file():
        raise SchemaError(f"{where}: table file not found (got path '{path}'); "
                          f"run `hetrain demo-data` to write the bundled demo tables")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401  (pandas needs it to read parquet)
        except ImportError:
            raise SchemaError(f"{where}: reading .parquet needs the 'pyarrow' package, "
                              f"which is not installed; install it or supply a .csv") from None
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise SchemaError(f"{where}: not a readable parquet file ({exc})") from exc
        return frame, lambda i: f"row {i + 1}"
    if suffix != ".csv":
        raise SchemaError(f"{where}: unsupported table format '{suffix}'; "
                          f"allowed suffixes are '.csv' and '.parquet'")
    try:
        # Keep every cell as text, and blank lines as rows, so line numbers stay exact.
        frame = pd.read_csv(path, dtype=str, na_filter=False, keep_default_na=False,
                            skip_blank_lines=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise SchemaError(f"{where}: the file is empty (0 bytes or only whitespace); "
                          f"a header line and at least one data row are needed") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{where}: cannot be parsed as a UTF-8 CSV file "
                          f"({str(exc).strip()})") from exc
    blank = frame.apply(lambda col: col.fillna("").str.strip().eq("")).all(axis=1).to_numpy()
    last = len(blank) - int(np.argmin(blank[::-1])) if not blank.all() else 0
    return frame.iloc[:last], lambda i: f"line {i + 2}"


def _text(series: pd.Series) -> np.ndarray:
    """Cells as stripped strings ('' for a missing cell)."""
    return np.array(["" if pd.isna(v) else str(v).strip() for v in series], dtype=object)


def _first_bad(mask: np.ndarray, text: np.ndarray, where: str, column: str,
               locate: Callable[[int], str]) -> tuple[str, str, int]:
    i = int(np.flatnonzero(mask)[0])
    return f"{where}, column '{column}', {locate(i)}", repr(text[i]), int(mask.sum())


def _parse(series: pd.Series, where: str, column: str,
           locate: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (numbers, text, unparsable mask); raise on empty/NaN cells."""
    text = _text(series)
    missing = np.array([t.lower() in _MISSING_TOKENS for t in text], dtype=bool)
    if missing.any():
        at, value, count = _first_bad(missing, text, where, column, locate)
        raise SchemaError(f"{at}: empty or NaN cell (got {value}); every cell must hold a "
                          f"value ({count} empty/NaN cell(s) in this column)")
    numbers = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(float)
    return numbers, text, ~np.isfinite(numbers)


def _read_ids(series: pd.Series, where: str, column: str,
              locate: Callable[[int], str]) -> pd.Series:
    text = _text(series)
    empty = text == ""
    if empty.any():
        at, value, count = _first_bad(empty, text, where, column, locate)
        raise SchemaError(f"{at}: empty ID cell (got {value}); every row needs an ID "
                          f"({count} empty ID cell(s))")
    ids = pd.Series(text, dtype=object)
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        groups = list(dup.groupby(dup, sort=False).groups.items())
        shown = "; ".join(f"{v!r} on {', '.join(locate(i) for i in rows)}"
                          for v, rows in groups[:_EXAMPLES])
        raise SchemaError(f"{where}, column '{column}': duplicate IDs: {shown} "
                          f"({len(groups)} duplicated ID(s) in all); each ID must appear once")
    return ids


def _read_floats(series: pd.Series, where: str, column: str,
                 locate: Callable[[int], str]) -> np.ndarray:
    numbers, text, bad = _parse(series, where, column, locate)
    if bad.any():
        at, value, count = _first_bad(bad, text, where, column, locate)
        raise SchemaError(f"{at}: non-numeric cell (got {value}); feature cells must be "
                          f"finite decimal numbers ({count} such cell(s) in this column)")
    return numbers.astype(np.float64)


def _read_labels(series: pd.Series, where: str, column: str,
                 locate: Callable[[int], str]) -> np.ndarray:
    numbers, text, bad = _parse(series, where, column, locate)
    with np.errstate(invalid="ignore"):
        bad |= (numbers < 0) | (np.floor(numbers) != numbers) | (numbers >= 2**31)
    if bad.any():
        at, value, count = _first_bad(bad, text, where, column, locate)
        raise SchemaError(f"{at}: bad label (got {value}); labels must be integers >= 0 "
                          f"({count} bad label(s) in this column)")
    return numbers.astype(np.int64)


def split_ids(ids: Iterable[object], *, seed: int,
              test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split IDs into (train, test) by a keyed SHA-256 of f"{seed}:{id}".

    Owners holding the same IDs get the same split, in the same canonical order
    (sorted by that hash), without talking to each other.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"split_ids: 'seed' must be an int (got {seed!r})")
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
            or not 0.0 < test_fraction <= 0.9):
        raise ConfigError(f"split_ids: 'test_fraction' must be a float in the range "
                          f"(0, 0.9] (got {test_fraction!r})")
    values = list(ids)
    counts = pd.Series([str(v) for v in values], dtype=object).value_counts()
    if len(counts) and counts.iloc[0] > 1:
        raise SchemaError(f"split_ids: IDs must be unique; {counts.iloc[0]} rows share the "
                          f"ID {counts.index[0]!r}")
    keyed = sorted((hashlib.sha256(f"{seed}:{v}".encode()).digest(), v) for v in values)
    cut = int(test_fraction * 2**64)
    train = [v for h, v in keyed if int.from_bytes(h[:8], "big") >= cut]
    test = [v for h, v in keyed if int.from_bytes(h[:8], "big") < cut]
    return np.array(train, dtype=object), np.array(test, dtype=object)


def align(frames: dict[str, pd.DataFrame], id_column: str) -> None:
    """Check that vertically partitioned owners hold exactly the same ID set."""
    if not frames:
        raise AlignmentError("align: no owners given; at least one table is needed (got an empty dict)")
    sets = {}
    for owner, frame in frames.items():
        if id_column not in frame.columns:
            raise SchemaError(f"owner '{owner}': ID column '{id_column}' is missing; "
                              f"the table has {list(frame.columns)}")
        sets[owner] = set(frame[id_column])
    (first, ref), problems = next(iter(sets.items())), []
    for owner, other in sets.items():
        if other == ref:
            continue
        parts = []
        for have, lack, extra in ((first, owner, ref - other), (owner, first, other - ref)):
            if extra:
                shown = ", ".join(repr(v) for v in sorted(extra, key=str)[:_EXAMPLES])
                parts.append(f"{len(extra)} ID(s) of '{have}' are missing in '{lack}' "
                             f"(e.g. {shown})")
        problems.append(f"owners '{first}' ({len(ref)} IDs) and '{owner}' ({len(other)} IDs) "
                        f"differ: " + "; ".join(parts))
    if problems:
        raise AlignmentError(" | ".join(problems) + f"; column '{id_column}' must hold exactly "
                             f"the same IDs for every owner when features are split")


class Standardizer:
    """Per-column (x - mean) / std from the owner's own train rows, clipped to [-clip, clip]."""

    def __init__(self, columns: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 clip: float = 4.0):
        self.columns, self.clip = list(columns), float(clip)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"Standardizer: 'clip' must be a finite float > 0 (got {clip!r})")
        shapes = {len(self.columns), self.mean.size, self.std.size}
        if len(shapes) != 1 or self.mean.ndim != 1 or self.std.ndim != 1:
            raise SchemaError(f"Standardizer: columns, mean and std must have one entry per "
                              f"column (got {len(self.columns)}, {self.mean.shape}, "
                              f"{self.std.shape})")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()
                and (self.std > 0).all()):
            raise SchemaError(f"Standardizer: mean must be finite and std finite and > 0 "
                              f"(got mean {self.mean.tolist()}, std {self.std.tolist()})")

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: Sequence[str], *,
            clip: float = 4.0) -> Standardizer:
        """Fit on train rows only; a constant column gets std 1, so it maps to 0."""
        values = _columns(frame, columns, "Standardizer.fit")
        if len(values) == 0:
            raise SchemaError("Standardizer.fit: needs at least one train row (got 0)")
        mean, std = values.mean(axis=0), values.std(axis=0)
        std = np.where(std <= 1e-12 * np.maximum(1.0, np.abs(mean)), 1.0, std)
        return cls(columns, mean, std, clip)

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Return a copy with the fitted columns standardised and clipped; others untouched."""
        values = _columns(frame, self.columns, "Standardizer.transform")
        out = frame.copy()
        out[self.columns] = np.clip((values - self.mean) / self.std, -self.clip, self.clip)
        return out

    def to_dict(self) -> dict:
        return {"columns": list(self.columns), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "clip": self.clip}

    @classmethod
    def from_dict(cls, data: dict) -> Standardizer:
        missing = [k for k in ("columns", "mean", "std", "clip") if k not in data]
        if missing:
            raise SchemaError(f"Standardizer.from_dict: missing key(s) {missing}; "
                              f"got keys {sorted(data)}")
        return cls(data["columns"], data["mean"], data["std"], data["clip"])


def _columns(frame: pd.DataFrame, columns: Sequence[str], where: str) -> np.ndarray:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing}; the frame has "
                          f"{list(frame.columns)}")
    return frame[list(columns)].to_numpy(dtype=np.float64)


def batches(n: int, batch_size: int) -> list[slice]:
    """Contiguous slices over the canonical order; the last one may be short."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"batches: 'n' must be an int >= 0 (got {n!r})")
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or not 8 <= batch_size <= 4096 or batch_size & (batch_size - 1)):
        raise ConfigError(f"batches: 'batch_size' must be a power of two in the range "
                          f"[8, 4096] (got {batch_size!r})")
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
