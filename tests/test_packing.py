"""Slot packing: where each sample and feature lands in the rows and cols layouts."""

import numpy as np
import pytest

from hetrain.core.errors import ConfigError
from hetrain.mpc_ops.layers.packing import PackingPlan, next_pow2

SLOTS = 64  # small plans keep the expected layouts readable; the maths is the same at 4096


@pytest.fixture
def plan() -> PackingPlan:
    return PackingPlan(slots=SLOTS, seg=8)  # 8 samples per ciphertext, feature segments of T=8


@pytest.fixture
def chunk() -> np.ndarray:
    """5 samples × 3 features, value 10*i + j, so every slot names its source."""
    return np.array([[10.0 * i + j for j in range(3)] for i in range(5)])


def test_rows_vector_puts_sample_i_feature_j_at_slot_i_times_seg_plus_j(plan, chunk):
    # Prepare
    before = chunk.copy()

    # Execute
    vec = plan.rows_vector(chunk)

    # Assert
    assert vec.shape == (SLOTS,)
    expected = np.zeros(SLOTS)
    for i in range(5):
        for j in range(3):
            expected[i * plan.seg + j] = chunk[i, j]
    np.testing.assert_array_equal(vec, expected)
    np.testing.assert_array_equal(chunk, before)


def test_cols_vector_puts_sample_i_feature_j_at_slot_j_times_t_plus_i(plan, chunk):
    # Prepare
    before = chunk.copy()

    # Execute
    vec = plan.cols_vector(chunk)

    # Assert
    assert vec.shape == (SLOTS,)
    expected = np.zeros(SLOTS)
    for i in range(5):
        for j in range(3):
            expected[j * plan.col_seg + i] = chunk[i, j]
    np.testing.assert_array_equal(vec, expected)
    np.testing.assert_array_equal(chunk, before)


def test_weight_vector_tiles_the_weight_column_once_per_sample_segment(plan):
    # Execute
    vec = plan.weight_vector(np.array([1.0, 2.0, 3.0]))

    # Assert
    np.testing.assert_array_equal(vec, np.tile([1.0, 2.0, 3.0, 0, 0, 0, 0, 0], plan.samples_per_ct))


def test_weight_vector_times_rows_summed_per_segment_is_x_times_w(plan, chunk):
    # Prepare
    w = np.array([0.5, -1.0, 2.0])

    # Execute: the plaintext version of the ciphertext forward
    per_segment = (plan.rows_vector(chunk) * plan.weight_vector(w)).reshape(-1, plan.seg).sum(axis=1)

    # Assert
    np.testing.assert_allclose(per_segment[:5], chunk @ w, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(per_segment[5:], 0.0)


def test_delta_vector_repeats_the_chunk_delta_in_the_first_n_features_segments(plan):
    # Prepare
    delta = np.array([1.0, -2.0, 3.0, -4.0, 5.0])

    # Execute
    vec = plan.delta_vector(delta, n_features=3)

    # Assert
    segments = vec.reshape(plan.seg, plan.col_seg)
    for j in range(3):
        np.testing.assert_array_equal(segments[j], [1.0, -2.0, 3.0, -4.0, 5.0, 0, 0, 0])
    np.testing.assert_array_equal(segments[3:], 0.0)


def test_delta_vector_times_cols_summed_per_segment_is_x_transpose_delta(plan, chunk):
    # Prepare
    delta = np.array([1.0, -2.0, 3.0, -4.0, 5.0])

    # Execute: the plaintext version of the ciphertext backward
    per_segment = (plan.cols_vector(chunk) * plan.delta_vector(delta, 3)).reshape(-1, plan.col_seg).sum(axis=1)

    # Assert
    np.testing.assert_allclose(per_segment[:3], chunk.T @ delta, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(per_segment[3:], 0.0)


@pytest.mark.parametrize("n, expected", [
    (1, [slice(0, 1)]),
    (8, [slice(0, 8)]),
    (9, [slice(0, 8), slice(8, 9)]),
    (20, [slice(0, 8), slice(8, 16), slice(16, 20)]),
])
def test_chunks_cover_the_batch_in_samples_per_ct_pieces(plan, n, expected):
    # Execute / Assert
    assert plan.chunks(n) == expected


@pytest.mark.parametrize("counts, seg", [([1], 1), ([3], 4), ([4], 4), ([5, 2], 8), ([30], 32), ([32, 32], 32), ([33], 64)])
def test_for_features_picks_the_next_power_of_two_of_the_widest_owner(counts, seg):
    # Execute
    plan = PackingPlan.for_features(counts, 4096)

    # Assert
    assert (plan.slots, plan.seg, plan.samples_per_ct, plan.col_seg) == (4096, seg, 4096 // seg, 4096 // seg)


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_next_pow2_is_the_smallest_power_of_two_not_below_n(n, expected):
    assert next_pow2(n) == expected


@pytest.mark.parametrize("seg", [0, 3, 12, 128])
def test_plan_refuses_a_seg_that_is_not_a_power_of_two_within_the_slots(seg):
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"packing seg must be a power of two in \[1, {SLOTS}\], got {seg}"):
        PackingPlan(slots=SLOTS, seg=seg)


def test_for_features_refuses_an_owner_wider_than_one_ciphertext():
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"an owner has 65 features; at most 64 fit in one ciphertext"):
        PackingPlan.for_features([3, 65], SLOTS)


@pytest.mark.parametrize("layout", ["rows_vector", "cols_vector"])
@pytest.mark.parametrize("shape", [(5, 9), (9, 3), (5,)])
def test_a_chunk_too_wide_too_long_or_not_2d_is_refused(plan, layout, shape):
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"a chunk must be at most 8 samples × 8 features, got shape \("):
        getattr(plan, layout)(np.ones(shape))
