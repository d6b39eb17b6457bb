"""CipherLinear against its plaintext twin PlainInputLinear, on the same weights and batch, through a real reveal."""

import numpy as np
import pytest

from hetrain.mpc_ops.crypto import ckks
from hetrain.mpc_ops.layers.cipher_layers import CipherLinear, PlainInputLinear
from hetrain.mpc_ops.layers.packing import PackingPlan
from hetrain.mpc_ops.reveal.protocol import blind, unblind
from hetrain.mpc_ops.crypto.tensors import EncryptedBatch, OwnerPart, PlainBatch

H = 8  # out_features, as declared by the ckks_keys fixture (enc1: 64 -> 8)
MASK_BOUND = 64.0


def tolerance(sigma: float) -> float:
    """The key holder floods with N(0, σ²) and rounds to a grid of step <= σ/16; the layer's gain
    (>= 1) divides both. The revealed σ here is the noise on the *scaled* values.

    8σ bounds the noise for every revealed value (P(|z| > 8) ≈ 1e-15 each, a few thousand
    values per test); the raw CKKS error (below 2^-28, see test_flooding.py) and the grid rounding
    (at most σ/32) hide in the 1e-6 and the 8σ.
    """
    return 8 * sigma + 1e-6


def encrypt_batch(public, plan: PackingPlan, x: np.ndarray, widths: list[int]) -> EncryptedBatch:
    """What the data owners publish: each owner's feature columns, chunk by chunk, in both layouts."""
    parts, start = [], 0
    for o, width in enumerate(widths):
        cols_x = x[:, start : start + width]
        rows = [ckks.encrypt(public, plan.rows_vector(cols_x[sl])) for sl in plan.chunks(len(x))]
        cols = [ckks.encrypt(public, plan.cols_vector(cols_x[sl])) for sl in plan.chunks(len(x))]
        parts.append(OwnerPart(f"owner{o}", np.arange(start, start + width), rows, cols))
        start += width
    return EncryptedBatch("test/b0000", len(x), parts, [f"{i:024x}" for i in range(len(x))])


def reveal(enc, ckks_keys, round_no=0) -> tuple[np.ndarray, float]:
    """Blind, let the fixture's key holder decrypt and flood, unblind."""
    holder, public = ckks_keys
    request, masks = blind(enc, public, key_id=holder.key_id, round_no=round_no, mask_bound=MASK_BOUND)
    response = holder.reveal(request)
    return unblind(enc, response, masks), response.sigma / min(enc.gains)


CASES = {
    # one owner, 30 features in 32-wide segments: 128 samples per ciphertext, so n=100 is one partial chunk
    "one_owner_partial_chunk": dict(widths=[30], n=100, chunks=1),
    # two owners (vertical), 32 + 32 features: n=200 spans two chunks (128 + 72)
    "two_owners_two_chunks": dict(widths=[32, 32], n=200, chunks=2),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def layer_case(request, ckks_keys):
    """Weights, a standardised-looking batch, its encryption, and both twins (built once per case)."""
    case = CASES[request.param]
    _, public = ckks_keys
    rng = np.random.default_rng(42)
    d = sum(case["widths"])
    x = rng.normal(size=(case["n"], d)).clip(-4, 4)
    w = rng.normal(scale=1 / np.sqrt(d), size=(d, H))
    delta = rng.normal(scale=0.1, size=(case["n"], H))
    plan = PackingPlan.for_features(case["widths"], ckks.slot_count(public))
    batch = encrypt_batch(public, plan, x, case["widths"])
    return dict(case, x=x, w=w, delta=delta, plan=plan, batch=batch, public=public)


@pytest.fixture(scope="module")
def layer_run(layer_case):
    """Run the ciphertext layer and its twin once per case; keep the inputs' bytes to check later."""
    c = layer_case
    blobs_before = [[bytes(b) for b in p.rows + p.cols] for p in c["batch"].parts]
    w_before, delta_before = c["w"].copy(), c["delta"].copy()
    cipher = CipherLinear("enc1", c["w"], c["public"], c["plan"])
    twin = PlainInputLinear("enc1", c["w"])
    enc_z = cipher.forward(c["batch"])
    enc_g = cipher.backward(c["delta"])
    z = twin.forward(PlainBatch(c["batch"].batch_id, c["x"]))
    g = twin.backward(c["delta"])
    return dict(enc_z=enc_z, enc_g=enc_g, z=z, g=g, blobs_before=blobs_before,
                w_before=w_before, delta_before=delta_before)


def test_forward_revealed_matches_the_plaintext_twin(layer_case, layer_run, ckks_keys):
    # Execute
    revealed, sigma = reveal(layer_run["enc_z"], ckks_keys)

    # Assert
    np.testing.assert_allclose(revealed, layer_case["x"] @ layer_case["w"], rtol=0, atol=tolerance(sigma))
    np.testing.assert_allclose(revealed, layer_run["z"], rtol=0, atol=tolerance(sigma))


def test_backward_revealed_matches_the_plaintext_twin(layer_case, layer_run, ckks_keys):
    # Execute
    revealed, sigma = reveal(layer_run["enc_g"], ckks_keys)

    # Assert
    np.testing.assert_allclose(revealed, layer_case["x"].T @ layer_case["delta"], rtol=0, atol=tolerance(sigma))
    np.testing.assert_allclose(revealed, layer_run["g"], rtol=0, atol=tolerance(sigma))


def test_forward_and_backward_leave_the_batch_weights_and_deltas_unchanged(layer_case, layer_run):
    # Assert: every ciphertext the owners published is byte-identical after the layer used it
    after = [list(p.rows + p.cols) for p in layer_case["batch"].parts]
    assert after == layer_run["blobs_before"]
    np.testing.assert_array_equal(layer_case["w"], layer_run["w_before"])
    np.testing.assert_array_equal(layer_case["delta"], layer_run["delta_before"])


def test_forward_tensor_describes_an_activation_of_n_by_h(layer_case, layer_run):
    # Prepare
    c, enc = layer_case, layer_run["enc_z"]
    n, d, chunks = c["n"], sum(c["widths"]), c["chunks"]

    # Assert
    assert (enc.kind, enc.layer, enc.shape, enc.aggregate) == ("activation", "enc1", (n, H), d)
    assert len(enc.blobs) == H * chunks
    assert enc.stride == [c["plan"].seg] * (H * chunks)
    assert sum(enc.counts) == n * H
    covered = np.zeros((n, H), dtype=int)
    for rows, col in enc.placement:
        covered[rows, col] += 1
    np.testing.assert_array_equal(covered, 1)  # every output cell is placed exactly once


def test_backward_tensor_describes_a_gradient_of_d_by_h_aggregating_the_batch(layer_case, layer_run):
    # Prepare
    c, enc = layer_case, layer_run["enc_g"]
    n, d, owners = c["n"], sum(c["widths"]), len(c["widths"])

    # Assert
    assert (enc.kind, enc.layer, enc.shape, enc.aggregate) == ("gradient", "enc1", (d, H), n)
    assert len(enc.blobs) == H * owners
    assert enc.stride == [c["plan"].col_seg] * (H * owners)
    assert enc.counts == [w for w in c["widths"] for _ in range(H)]
    covered = np.zeros((d, H), dtype=int)
    for rows, col in enc.placement:
        covered[rows, col] += 1
    np.testing.assert_array_equal(covered, 1)


def test_backward_before_forward_is_refused(ckks_keys):
    # Prepare
    _, public = ckks_keys
    cipher = CipherLinear("enc1", np.zeros((4, H)), public, PackingPlan(slots=4096, seg=4))
    twin = PlainInputLinear("enc1", np.zeros((4, H)))

    # Execute / Assert: both twins refuse the same way
    for layer in (cipher, twin):
        with pytest.raises(RuntimeError, match=r"layer 'enc1': backward called before forward"):
            layer.backward(np.zeros((8, H)))


def test_gain_scaling_divides_the_flooding_noise_without_leaving_the_headroom(ckks_keys):
    # Prepare: deltas as a mean loss produces them (they carry 1/n), so their L1 norm is small
    from hetrain.mpc_ops.layers.packing import FEATURE_CLIP, gain_for

    holder, public = ckks_keys
    rng = np.random.default_rng(3)
    plan = PackingPlan.for_features([32, 32], holder.params.slots)
    x = np.clip(rng.normal(size=(128, 64)), -FEATURE_CLIP, FEATURE_CLIP)
    w = rng.normal(scale=0.1, size=(64, H))
    delta = rng.normal(size=(128, H)) / 128
    layer = CipherLinear("enc1", w, public, plan, holder.params.headroom, MASK_BOUND)
    # Execute
    layer.forward(encrypt_batch(public, plan, x, [32, 32]))
    enc_g = layer.backward(delta)
    revealed, sigma = reveal(enc_g, ckks_keys)
    # Assert: every gain obeys the headroom bound and is > 1 here, and the error shrinks with it
    room = holder.params.headroom / 2 - MASK_BOUND
    for gain, (_, k) in zip(enc_g.gains, enc_g.placement):
        assert gain == gain_for(np.abs(delta[:, k]).sum(), holder.params.headroom, MASK_BOUND)
        assert gain * FEATURE_CLIP * np.abs(delta[:, k]).sum() <= room + 1e-9
        assert gain > 1.0
    np.testing.assert_allclose(revealed, x.T @ delta, rtol=0, atol=tolerance(sigma))


@pytest.mark.parametrize("forward", ["rows", "column"])
def test_a_zero_delta_column_and_a_zero_weight_column_reveal_zero_and_training_goes_on(ckks_keys, forward):
    # Prepare: a dead unit (its δ column is all zero) and an all-zero weight column, two owners
    holder, public = ckks_keys
    rng = np.random.default_rng(5)
    plan = PackingPlan.for_features([32, 32], holder.params.slots, forward=forward)
    x = rng.normal(size=(100, 64)).clip(-4, 4)
    w = rng.normal(scale=0.1, size=(64, H))
    w[:, 2] = 0.0
    delta = rng.normal(scale=0.1, size=(100, H))
    delta[:, 3] = 0.0
    layer = CipherLinear("enc1", w, public, plan, holder.params.headroom, MASK_BOUND)
    batch = encrypt_batch(public, plan, x, [32, 32])
    if forward == "column":
        for part in batch.parts:
            cols_x = x[:, part.feature_index]
            part.column = [ckks.encrypt(public, v) for sl in plan.column_chunks(len(x))
                           for v in plan.column_vectors(cols_x[sl])]

    # Execute: both reveals go through the key holder (before the fix: BundleError, a level too high)
    z, z_sigma = reveal(layer.forward(batch), ckks_keys)
    g, g_sigma = reveal(layer.backward(delta), ckks_keys)

    # Assert
    np.testing.assert_allclose(z, x @ w, rtol=0, atol=tolerance(z_sigma))
    np.testing.assert_allclose(g, x.T @ delta, rtol=0, atol=tolerance(g_sigma))
    assert np.abs(g[:, 3]).max() <= tolerance(g_sigma)
