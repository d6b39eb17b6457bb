"""Bundled demo tables: scikit-learn's offline datasets, cut up as real data owners would hold them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer, load_digits

from hetrain.core.errors import SchemaError

_BC_BASES = ("radius", "texture", "perimeter", "area", "smoothness", "compactness",
             "concavity", "concave_points", "symmetry", "fractal_dimension")
BREAST_CANCER_FEATURES = ([f"mean_{b}" for b in _BC_BASES] + [f"{b}_error" for b in _BC_BASES]
                          + [f"worst_{b}" for b in _BC_BASES])
DIGITS_FEATURES_A = [f"px_{i:02d}" for i in range(32)]
DIGITS_FEATURES_B = [f"px_{i:02d}" for i in range(32, 64)]
ID_COLUMN, LABEL_COLUMN = "id", "label"
_SEED = 20240601


def write_demo_data(out_dir: Path) -> list[Path]:
    """Write the four demo CSVs under out_dir and return their paths.

    breast_cancer/clinic_a.csv, clinic_b.csv: a horizontal split (same columns, disjoint rows).
    digits/bank_pixels.csv (px_00..px_31), digits/telco_pixels.csv (px_32..px_63 and label):
    a vertical split of the same samples, each file in its own shuffled row order.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(_SEED)
    return [*_write_breast_cancer(out_dir / "breast_cancer", rng),
            *_write_digits(out_dir / "digits", rng)]


def _write_breast_cancer(folder: Path, rng: np.random.Generator) -> list[Path]:
    data = load_breast_cancer()
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    if names != BREAST_CANCER_FEATURES:
        raise SchemaError(f"scikit-learn's breast cancer features changed: expected "
                          f"{BREAST_CANCER_FEATURES}, got {names}")
    table = pd.DataFrame(data.data, columns=BREAST_CANCER_FEATURES)
    table.insert(0, ID_COLUMN, [f"bc-{i + 1:04d}" for i in range(len(table))])
    table[LABEL_COLUMN] = data.target.astype(np.int64)
    in_a = np.zeros(len(table), dtype=bool)
    in_a[rng.permutation(len(table))[: len(table) // 2]] = True
    return [_write_csv(table[in_a], folder / "clinic_a.csv"),
            _write_csv(table[~in_a], folder / "clinic_b.csv")]


def _write_digits(folder: Path, rng: np.random.Generator) -> list[Path]:
    data = load_digits()
    pixels = pd.DataFrame(data.data.astype(np.int64),
                          columns=DIGITS_FEATURES_A + DIGITS_FEATURES_B)
    ids = [f"dg-{i + 1:04d}" for i in range(len(pixels))]
    bank = pd.concat([pd.DataFrame({ID_COLUMN: ids}), pixels[DIGITS_FEATURES_A]], axis=1)
    telco = pd.concat([pd.DataFrame({ID_COLUMN: ids}), pixels[DIGITS_FEATURES_B]], axis=1)
    telco[LABEL_COLUMN] = data.target.astype(np.int64)
    # Each owner keeps its own row order, so joining by position would silently mismatch.
    return [_write_csv(bank.iloc[rng.permutation(len(bank))], folder / "bank_pixels.csv"),
            _write_csv(telco.iloc[rng.permutation(len(telco))], folder / "telco_pixels.csv")]


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write atomically: a temporary file in the same folder, fsynced, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            frame.to_csv(handle, index=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
