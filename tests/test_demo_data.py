"""Tests for hetrain.participants.demo_data: the bundled tables load cleanly with the exported schemas."""

import pandas as pd
import pytest

from hetrain.participants.demo_data import (BREAST_CANCER_FEATURES, DIGITS_FEATURES_A,
                                    DIGITS_FEATURES_B, write_demo_data)
from hetrain.participants.table import align, load_table


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out)


def test_demo_data_writes_the_four_owner_files_and_no_temporaries(demo_dir):
    # Prepare
    out, paths = demo_dir
    # Assert
    rel = sorted(str(p.relative_to(out)) for p in paths)
    assert rel == ["breast_cancer/clinic_a.csv", "breast_cancer/clinic_b.csv",
                   "digits/bank_pixels.csv", "digits/telco_pixels.csv"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == rel


def test_breast_cancer_clinics_round_trip_and_split_the_569_rows(demo_dir):
    # Prepare
    out, _ = demo_dir
    # Execute
    frames = [load_table(out / "breast_cancer" / f"clinic_{c}.csv", owner=f"clinic_{c}",
                         id_column="id", feature_columns=BREAST_CANCER_FEATURES,
                         label_column="label") for c in "ab"]
    # Assert
    assert len(BREAST_CANCER_FEATURES) == 30 and "mean_radius" in BREAST_CANCER_FEATURES
    assert sum(len(f) for f in frames) == 569
    assert all(240 <= len(f) <= 330 for f in frames)
    assert not set(frames[0]["id"]) & set(frames[1]["id"])
    assert set(frames[0]["label"]) | set(frames[1]["label"]) == {0, 1}
    assert frames[0]["id"].iloc[0].startswith("bc-")


def test_digits_owners_align_on_id_but_hold_rows_in_different_orders(demo_dir):
    # Prepare
    out, _ = demo_dir
    # Execute
    bank = load_table(out / "digits" / "bank_pixels.csv", owner="bank", id_column="id",
                      feature_columns=DIGITS_FEATURES_A, label_column=None)
    telco = load_table(out / "digits" / "telco_pixels.csv", owner="telco", id_column="id",
                       feature_columns=DIGITS_FEATURES_B, label_column="label")
    align({"bank": bank, "telco": telco}, "id")
    # Assert
    assert len(bank) == len(telco) == 1797
    assert DIGITS_FEATURES_A[0] == "px_00" and DIGITS_FEATURES_B[-1] == "px_63"
    assert list(bank["id"]) != list(telco["id"])
    assert set(telco["label"]) == set(range(10))


def test_demo_data_is_deterministic(demo_dir, tmp_path):
    # Prepare
    out, paths = demo_dir
    # Execute
    again = write_demo_data(tmp_path)
    # Assert
    for first, second in zip(paths, again):
        pd.testing.assert_frame_equal(pd.read_csv(first), pd.read_csv(second))
