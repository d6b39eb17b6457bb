"""The TenSEAL Tutorial 1 baseline: result shape, the encrypted update against numpy, the data split."""

import numpy as np
import pytest
import tenseal as ts

from hetrain.bench.tutorial_lr import (
    LAYOUT,
    SIGMOID_COEFFS,
    WEIGHT_DECAY,
    EncryptedLR,
    breast_cancer_split,
    encrypt_dataset,
    init_params,
    make_context,
    run_tutorial_lr,
    train_epoch,
)

# At the tutorial's scale of 2**21, TenSEAL's `dot` (rotations) carries a per-key offset of order 1
# (see the module docstring), which would hide the update algebra. The algebra is therefore
# checked in a precise context (N=16384, scale 2**40, same six levels), where one epoch stays
# within about 1e-5 of numpy; 1e-4 leaves a 10x margin.
PRECISE_CONTEXT = {"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": [60] + [40] * 6 + [60], "scale_bits": 40}
PRECISE_ATOL = 1e-4


@pytest.fixture(scope="module")
def small_split():
    x_train, y_train, x_test, y_test = breast_cancer_split(seed=0)
    return x_train[:24], y_train[:24], x_test[:40], y_test[:40]  # about 0.2 s per sample and epoch


def numpy_epoch(weight, bias, x, y):
    """The tutorial's update rule in plaintext: polynomial sigmoid, mean gradient, 0.05 weight decay."""
    w, b = np.asarray(weight, dtype=float), float(bias[0])
    z = x @ w + b
    out = SIGMOID_COEFFS[0] + SIGMOID_COEFFS[1] * z + SIGMOID_COEFFS[3] * z**3
    diff = out - y
    delta_w, delta_b = (x * diff[:, None]).sum(axis=0), diff.sum()
    n = len(y)
    return w - (delta_w / n + w * WEIGHT_DECAY), b - delta_b / n


@pytest.mark.integration  # TenSEAL keys
def test_one_epoch_returns_every_key_with_positive_timings(small_split):
    # Prepare
    x_train, y_train, x_test, y_test = small_split

    # Execute
    result = run_tutorial_lr(x_train, y_train, x_test, y_test, epochs=1, seed=0)

    # Assert
    assert set(result) == {
        "encrypt_seconds", "seconds_per_epoch", "epoch_seconds", "test_accuracy", "accuracy_per_epoch",
        "epochs", "n_train", "layout",
    }
    assert result["encrypt_seconds"] > 0 and result["seconds_per_epoch"] > 0
    assert len(result["epoch_seconds"]) == 1 and result["seconds_per_epoch"] == result["epoch_seconds"][0]
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert (result["epochs"], result["n_train"], result["layout"]) == (1, 24, LAYOUT)
    assert result["accuracy_per_epoch"] == [result["test_accuracy"]]


@pytest.mark.integration  # TenSEAL keys
def test_default_context_has_the_tutorial_parameters():
    # Prepare / Execute
    ctx = make_context()

    # Assert
    assert ctx.global_scale == 2**21
    assert ctx.has_galois_keys() and ctx.is_private()
    assert ts.ckks_vector(ctx, [1.0, 2.0]).decrypt() == pytest.approx([1.0, 2.0], abs=1e-2)


@pytest.mark.integration  # TenSEAL keys
def test_encrypted_epoch_matches_the_numpy_update_rule(small_split):
    # Prepare: 10 samples keep the N=16384 epoch near 3 s
    x_train, y_train = small_split[0][:10], small_split[1][:10]
    weight, bias = init_params(x_train.shape[1], seed=0)
    expected_w, expected_b = numpy_epoch(weight, bias, x_train, y_train)
    ctx = make_context(**PRECISE_CONTEXT)
    enc_x, enc_y = encrypt_dataset(ctx, x_train, y_train)
    eelr = EncryptedLR(weight, bias)

    # Execute
    seconds = train_epoch(eelr, ctx, enc_x, enc_y)

    # Assert: the weights come back decrypted, equal to the plaintext rule within CKKS noise
    assert seconds > 0
    assert isinstance(eelr.weight, list) and len(eelr.weight) == x_train.shape[1]
    np.testing.assert_allclose(eelr.weight, expected_w, atol=PRECISE_ATOL)
    assert eelr.bias[0] == pytest.approx(expected_b, abs=PRECISE_ATOL)
    assert np.abs(expected_w - np.asarray(weight)).max() > 100 * PRECISE_ATOL  # the update actually moved the weights


def test_update_without_a_forward_pass_is_refused():
    # Prepare
    eelr = EncryptedLR(*init_params(3, seed=0))

    # Execute / Assert
    with pytest.raises(RuntimeError, match="at least run one forward iteration"):
        eelr.update()


def test_breast_cancer_split_is_deterministic_stratified_and_standardised():
    # Prepare / Execute
    first, second = breast_cancer_split(seed=3), breast_cancer_split(seed=3)
    x_train, y_train, x_test, y_test = first

    # Assert
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(breast_cancer_split(seed=4)[0], x_train)
    assert (x_train.shape, x_test.shape) == ((455, 30), (114, 30))
    assert y_train.mean() == pytest.approx(y_test.mean(), abs=0.01)  # stratified
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0, atol=1e-12)
