"""The key holder's reveal ledger: the per-sample rank limit across rounds and keys, the rows a
request must name, and the DP noise and ε accounting on gradient releases."""

import hashlib
import json

import numpy as np
import pytest

from hetrain.mpc_ops.reveal import dp
from hetrain.core.config import DpConfig
from hetrain.core.errors import BundleError, PolicyRefusal
from hetrain.mpc_ops.reveal.ledger import LEDGER_FILE
from hetrain.participants.key_holder import KeyHolder

from test_key_holder import SLOTS, last_audit, make_holder, make_request, row_ids


def weights(i: int) -> str:
    return hashlib.sha256(f"weights-{i}".encode()).hexdigest()


@pytest.fixture
def holder30(tmp_path):
    """30 inputs -> 2 outputs: the default limit (d - 1 = 29) allows 14 distinct weights per sample."""
    return make_holder(tmp_path / "key_holder", shape=(30, 2))


def activation(holder, public, rows, w):
    # one blob per output, each holding the batch's rows (VALUES holds 4 slots: use 2 rows × 2 outputs)
    return make_request(holder, public, kind="activation", n_blobs=1, rows=rows, weights=w)


@pytest.mark.integration  # TenSEAL keys
def test_fifteenth_distinct_weights_for_the_same_rows_are_refused_at_the_rank_limit(holder30):
    # Prepare: 2 rows × 2 outputs = 4 values per request; 14 × 2 = 28 <= 29 combinations allowed
    holder, public = holder30
    rows = row_ids(2)
    for i in range(14):
        holder.reveal(activation(holder, public, rows, weights(i)))
    used = holder.decryptions_used

    # Execute
    with pytest.raises(PolicyRefusal, match=(
        r"policy rule 'rank_limit' refused the reveal: layer 'enc1': a sample in this batch was already "
        r"revealed under 14 distinct weights; one more would give the trainer 30 combinations of its 30 "
        r"features, over the limit of 29")):
        holder.reveal(activation(holder, public, rows, weights(14)))

    # Assert: refused before decryption, audited; the same weights again are still allowed (no new rank)
    assert holder.decryptions_used == used
    assert (last_audit(holder)["decision"], last_audit(holder)["rule"]) == ("refuse", "rank_limit")
    holder.reveal(activation(holder, public, rows, weights(3)))
    # other samples are untouched by the first rows' history
    holder.reveal(activation(holder, public, row_ids(2, start=100), weights(14)))


@pytest.mark.integration  # TenSEAL keys
def test_a_row_shared_with_an_exhausted_batch_is_refused_even_in_a_new_batch(holder30):
    # Prepare: row 0 reaches 14 weights in batch {0, 1}
    holder, public = holder30
    for i in range(14):
        holder.reveal(activation(holder, public, row_ids(2), weights(i)))

    # Execute / Assert: a different batch composition that includes row 0 is still refused
    with pytest.raises(PolicyRefusal, match="rank_limit"):
        holder.reveal(activation(holder, public, [row_ids(1)[0], row_ids(1, start=50)[0]], weights(99)))


@pytest.mark.integration  # TenSEAL keys
def test_a_lower_max_rank_is_enforced(tmp_path):
    # Prepare: max_rank 4 with 2 outputs allows 2 distinct weights
    holder, public = make_holder(tmp_path / "kh", shape=(30, 2), reveals={"enc1": {"max_rank": 4}})
    holder.reveal(activation(holder, public, row_ids(2), weights(0)))
    holder.reveal(activation(holder, public, row_ids(2), weights(1)))

    # Execute / Assert
    with pytest.raises(PolicyRefusal, match=r"over the limit of 4 \(policy.reveals.enc1.max_rank\)"):
        holder.reveal(activation(holder, public, row_ids(2), weights(2)))


@pytest.mark.integration  # TenSEAL keys
def test_the_ledger_survives_a_reopen_and_a_key_rotation(holder30, tmp_path):
    # Prepare
    holder, public = holder30
    for i in range(14):
        holder.reveal(activation(holder, public, row_ids(2), weights(i)))
    KeyHolder.rotate(holder.directory)

    # Execute: a fresh key in the same directory
    fresh, fresh_public = make_holder(holder.directory, shape=(30, 2))

    # Assert: a new key does not make old reveals forgotten
    assert fresh.key_id != holder.key_id
    with pytest.raises(PolicyRefusal, match="rank_limit"):
        fresh.reveal(activation(fresh, fresh_public, row_ids(2), weights(20)))
    ledger = json.loads((holder.directory / LEDGER_FILE).read_text())
    assert all(len(v) == 14 for v in ledger["weights"]["enc1"].values())


@pytest.mark.parametrize("change, error, message", [
    ({"rows": row_ids(3)}, PolicyRefusal, r"'undeclared_rows'.*reveals 4 values, which is not 3 named rows × 2 outputs"),
    ({"rows": []}, PolicyRefusal, r"'undeclared_rows'.*which is not 0 named rows"),
    ({"weights": ""}, PolicyRefusal, r"'undeclared_weights'.*must carry the SHA-256 of the weights"),
    ({"rows": ["zz"] * 2}, BundleError, r"'rows' must be a list of at most 65536 hex sample pseudonyms"),
    ({"rows": [row_ids(1)[0]] * 2}, BundleError, r"'rows' names 1 sample\(s\) twice"),
], ids=["too_few_rows", "no_rows", "no_weights", "not_hex", "duplicate"])
@pytest.mark.integration  # TenSEAL keys
def test_an_activation_request_must_name_its_rows_and_weights(holder30, change, error, message):
    # Prepare
    holder, public = holder30
    request = activation(holder, public, row_ids(2), weights(0))
    for key, value in change.items():
        setattr(request, key, value)

    # Execute / Assert: refused before any decryption
    with pytest.raises(error, match=message):
        holder.reveal(request)
    assert holder.decryptions_used == 0


@pytest.mark.integration  # TenSEAL keys
def test_a_gradient_must_name_as_many_rows_as_it_aggregates(keys_default):
    holder, public = keys_default
    with pytest.raises(PolicyRefusal, match=r"'undeclared_rows'.*a gradient over 64 samples must name those 64 rows; it names 10"):
        holder.reveal(make_request(holder, public, kind="gradient", aggregate=64, rows=row_ids(10)))


@pytest.fixture
def keys_default(tmp_path):
    return make_holder(tmp_path / "kh")


# ---- DP on gradient releases -------------------------------------------------------------------


def test_dp_sigma_is_the_noise_multiplier_times_the_per_sample_sensitivity():
    cfg = DpConfig(noise_multiplier=2.0, clip=0.5)
    # FEATURE_CLIP (4) · sqrt(64) · clip / n
    assert dp.sensitivity(64, 0.5, 32) == pytest.approx(4 * 8 * 0.5 / 32)
    assert dp.sigma(cfg, 64, 32) == pytest.approx(2.0 * 0.5)


def test_epsilon_follows_zcdp_composition():
    cfg = DpConfig(noise_multiplier=1.0, delta=1e-5)
    rho = 4 / 2.0
    assert dp.epsilon(cfg, 4) == pytest.approx(rho + 2 * np.sqrt(rho * np.log(1e5)))
    assert dp.epsilon(cfg, 0) == 0.0
    assert dp.epsilon(cfg, 8) > dp.epsilon(cfg, 4)


def test_clip_rows_bounds_each_samples_loss_gradient():
    grad = np.array([[3.0, 4.0], [0.3, 0.4]]) / 2  # n = 2: per-sample loss gradients (3,4) and (0.3,0.4)
    clipped = dp.clip_rows(grad, 1.0)
    np.testing.assert_allclose(np.linalg.norm(clipped * 2, axis=1), [1.0, 0.5])
    np.testing.assert_allclose(clipped[1], grad[1])


@pytest.mark.integration  # TenSEAL keys
def test_key_holder_adds_dp_noise_of_the_stated_sigma_to_gradients_and_reports_epsilon(tmp_path):
    # Prepare: a large σ_dp so the flooding noise (≈0.2) is negligible next to it
    holder, public = make_holder(tmp_path / "kh", shape=(64, 8))
    holder.policy = holder.policy.model_copy(update={"dp": DpConfig(noise_multiplier=50.0, clip=1.0)})
    holder.ledger.policy = holder.policy
    expected = dp.sigma(holder.policy.dp, 64, 32)  # 50 · 4 · 8 · 1 / 32 = 50
    request = make_request(holder, public, kind="gradient", aggregate=32)
    request.counts, request.stride = [SLOTS], [1]  # every slot: many samples of the noise

    # Execute
    response = holder.reveal(request)

    # Assert: the noise std matches σ_dp within 5% (4096 samples: the std's relative error is ~1.1%)
    noise = response.values[0][4:]  # slots past VALUES hold zeros
    assert np.std(noise) == pytest.approx(expected, rel=0.05)
    assert last_audit(holder)["dp_sigma"] == pytest.approx(expected)
    summary = holder.audit_summary()["ledger"]["enc1"]
    assert summary["max_gradient_releases"] == 1
    assert summary["dp_epsilon"] == pytest.approx(round(dp.epsilon(holder.policy.dp, 1), 4))


@pytest.mark.integration  # TenSEAL keys
def test_without_dp_gradients_carry_only_the_flooding_noise(keys_default):
    holder, public = keys_default
    request = make_request(holder, public, kind="gradient", aggregate=32)
    request.counts, request.stride = [SLOTS], [1]
    response = holder.reveal(request)
    assert np.std(response.values[0][4:]) == pytest.approx(response.sigma, rel=0.05)
    assert holder.audit_summary()["ledger"]["enc1"]["dp_epsilon"] is None
