"""Tests for hetrain.participants.table: schema validation, split, alignment, standardising, batching."""

import json

import numpy as np
import pandas as pd
import pytest

from hetrain.core.errors import AlignmentError, ConfigError, SchemaError
from hetrain.participants.table import Standardizer, align, batches, load_table, split_ids

GOOD_CSV = "id,f1,f2,extra,label\na-1,1.5,2,x,0\na-2,3,4.25,y,1\na-3,-1e2,0,z,2\n"


def write(tmp_path, text, name="owner.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(path, label="label", features=("f1", "f2")):
    return load_table(path, owner="clinic_a", id_column="id",
                      feature_columns=list(features), label_column=label)


def test_load_table_returns_declared_columns_typed_in_file_order(tmp_path):
    # Prepare
    path = write(tmp_path, GOOD_CSV)
    # Execute
    frame = load(path)
    # Assert
    assert list(frame.columns) == ["id", "f1", "f2", "label"]
    assert list(frame["id"]) == ["a-1", "a-2", "a-3"]
    assert frame["f1"].dtype == np.float64 and frame["f2"].dtype == np.float64
    assert frame["label"].dtype == np.int64
    np.testing.assert_array_equal(frame["f1"], [1.5, 3.0, -100.0])
    np.testing.assert_array_equal(frame["label"], [0, 1, 2])


def test_load_table_without_label_returns_only_id_and_features(tmp_path):
    # Prepare
    path = write(tmp_path, GOOD_CSV)
    # Execute
    frame = load(path, label=None)
    # Assert
    assert list(frame.columns) == ["id", "f1", "f2"]


def test_missing_file_names_path_and_hints_demo_data(tmp_path):
    # Prepare
    path = tmp_path / "absent.csv"
    # Execute / Assert
    with pytest.raises(SchemaError, match=r"(?s)clinic_a.*absent\.csv.*not found.*hetrain demo-data"):
        load(path)


def test_missing_column_lists_missing_and_found_columns(tmp_path):
    # Prepare
    path = write(tmp_path, "id,f1,label\na-1,1,0\n")
    # Execute / Assert
    with pytest.raises(SchemaError, match=r"clinic_a.*owner\.csv.*missing column\(s\) \['f2'\]"
                                          r".*file has \['id', 'f1', 'label'\]"):
        load(path)


def test_non_numeric_cell_names_column_line_and_value(tmp_path):
    # Prepare
    path = write(tmp_path, "id,f1,f2,label\na-1,1,2,0\na-2,1,abc,1\n")
    # Execute / Assert
    with pytest.raises(SchemaError, match=r"owner\.csv', column 'f2', line 3: non-numeric cell "
                                          r"\(got 'abc'\)"):
        load(path)


@pytest.mark.parametrize("cell", ["", "NaN"])
def test_empty_or_nan_cell_names_column_and_line(tmp_path, cell):
    # Prepare
    path = write(tmp_path, f"id,f1,f2,label\na-1,1,2,0\na-2,3,4,1\na-3,{cell},4,1\n")
    # Execute / Assert
    with pytest.raises(SchemaError, match=rf"column 'f1', line 4: empty or NaN cell \(got '{cell}'\)"):
        load(path)


def test_empty_file_is_rejected(tmp_path):
    # Prepare
    path = write(tmp_path, "")
    # Execute / Assert
    with pytest.raises(SchemaError, match=r"clinic_a.*owner\.csv.*the file is empty"):
        load(path)


def test_header_only_file_is_rejected_for_having_no_rows(tmp_path):
    # Prepare
    path = write(tmp_path, "id,f1,f2,label\n")
    # Execute / Assert
    with pytest.raises(SchemaError, match=r"owner\.csv.*no data rows"):
        load(path)


def test_duplicate_ids_name_the_id_and_its_lines(tmp_path):
    # Prepare
    path = write(tmp_path, "id,f1,f2,label\na-1,1,2,0\na-2,1,2,0\na-1,3,4,1\n")
    # Execute / Assert
    with pytest.raises(SchemaError, match=r"column 'id': duplicate IDs: 'a-1' on line 2, line 4"):
        load(path)


@pytest.mark.parametrize("label", ["-1", "1.5", "yes"])
def test_bad_label_names_line_and_value(tmp_path, label):
    # Prepare
    path = write(tmp_path, f"id,f1,f2,label\na-1,1,2,0\na-2,1,2,{label}\n")
    # Execute / Assert
    with pytest.raises(SchemaError, match=rf"column 'label', line 3: bad label \(got '{label}'\)"
                                          r".*integers >= 0"):
        load(path)


def test_parquet_without_pyarrow_says_pyarrow_is_needed(tmp_path):
    # Prepare
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    path = write(tmp_path, "not really parquet", name="owner.parquet")
    # Execute / Assert
    with pytest.raises(SchemaError, match=r"owner\.parquet.*needs the 'pyarrow' package"):
        load(path)


def test_split_is_deterministic_and_identical_for_owners_with_shuffled_rows():
    # Prepare
    ids = [f"dg-{i:04d}" for i in range(1, 501)]
    shuffled = list(np.random.default_rng(7).permutation(ids))
    ids_before = list(ids)
    # Execute
    train_a, test_a = split_ids(ids, seed=3, test_fraction=0.2)
    train_b, test_b = split_ids(pd.Series(shuffled), seed=3, test_fraction=0.2)
    train_c, _ = split_ids(ids, seed=4, test_fraction=0.2)
    # Assert
    assert list(train_a) == list(train_b) and list(test_a) == list(test_b)
    assert sorted([*train_a, *test_a]) == sorted(ids)
    assert 50 <= len(test_a) <= 150
    assert list(train_a) != list(train_c)
    assert ids == ids_before


@pytest.mark.parametrize("fraction", [0.0, 0.95, -0.1])
def test_split_rejects_test_fraction_outside_range(fraction):
    # Prepare
    ids = ["a", "b", "c"]
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"'test_fraction'.*\(0, 0\.9\] \(got {fraction}\)"):
        split_ids(ids, seed=0, test_fraction=fraction)


def test_align_accepts_same_ids_in_different_order():
    # Prepare
    frames = {"bank": pd.DataFrame({"id": ["a", "b", "c"]}),
              "telco": pd.DataFrame({"id": ["c", "a", "b"]})}
    # Execute / Assert (no exception)
    align(frames, "id")


def test_align_names_owners_counts_and_example_ids_on_mismatch():
    # Prepare
    frames = {"bank": pd.DataFrame({"id": ["a", "b", "c", "d"]}),
              "telco": pd.DataFrame({"id": ["a", "b", "x"]})}
    # Execute / Assert
    with pytest.raises(AlignmentError, match=r"'bank' \(4 IDs\) and 'telco' \(3 IDs\).*"
                                             r"2 ID\(s\) of 'bank' are missing in 'telco' "
                                             r"\(e\.g\. 'c', 'd'\).*1 ID\(s\) of 'telco' are "
                                             r"missing in 'bank' \(e\.g\. 'x'\)"):
        align(frames, "id")


def test_standardizer_maps_train_columns_to_mean_0_std_1_and_constant_column_to_0():
    # Prepare
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"id": list("abcdefgh"), "f1": rng.normal(5, 3, 8),
                          "f2": np.full(8, 0.1), "label": [0, 1] * 4})
    before = frame.copy()
    # Execute
    scaler = Standardizer.fit(frame, ["f1", "f2"], clip=100.0)
    out = scaler.transform(frame)
    # Assert
    np.testing.assert_allclose(out["f1"].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(out["f1"].std(ddof=0), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(out["f2"], np.zeros(8))
    assert list(out["id"]) == list(frame["id"]) and list(out["label"]) == list(frame["label"])
    pd.testing.assert_frame_equal(frame, before)


def test_standardizer_clips_to_bound_and_round_trips_through_json():
    # Prepare
    train = pd.DataFrame({"f1": [0.0, 1.0, 2.0, 3.0]})
    scaler = Standardizer.fit(train, ["f1"])
    outlier = pd.DataFrame({"f1": [1000.0, -1000.0]})
    # Execute
    clipped = scaler.transform(outlier)
    restored = Standardizer.from_dict(json.loads(json.dumps(scaler.to_dict())))
    # Assert
    np.testing.assert_array_equal(clipped["f1"], [4.0, -4.0])
    pd.testing.assert_frame_equal(restored.transform(train), scaler.transform(train))


def test_batches_are_contiguous_with_a_short_last_batch():
    # Execute
    parts = batches(20, 8)
    # Assert
    assert parts == [slice(0, 8), slice(8, 16), slice(16, 20)]


@pytest.mark.parametrize("size", [12, 4, 8192])
def test_batch_size_not_a_power_of_two_in_range_is_rejected(size):
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"'batch_size' must be a power of two in the range "
                                          rf"\[8, 4096\] \(got {size}\)"):
        batches(100, size)
