"""The verified reveal (policy.trainer: untrusted): the key holder decrypts only Σ_j m_jk·ct_j + M_k for the
owners' tagged ciphertexts, under its own weights; everything else is refused before any decryption."""

from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import yaml

from hetrain.bench.leakage import key_attack
from hetrain.configure import load_config
from hetrain.core.errors import BundleError, PolicyRefusal
from hetrain.core.shapes import reveal_shapes
from hetrain.mpc_ops.crypto import ckks, ring
from hetrain.mpc_ops.exchange.verified_bundle import VerifiedStore
from hetrain.mpc_ops.reveal import verified
from hetrain.participants import verified_owner
from hetrain.participants.data_owner import load_split
from hetrain.participants.key_holder import VERIFIED_ERROR_BOUND, KeyHolder

pytestmark = pytest.mark.integration  # TenSEAL keys

FEATURES = ["f0", "f1", "f2", "f3", "f4", "f5"]
CONFIG = {
    "name": "verified", "seed": 5,
    "data": {"partition": "horizontal", "task": "binary", "test_fraction": 0.25,
             "owners": [{"name": "clinic", "path": "table.csv", "label": True, "features": FEATURES}]},
    "model": {"layers": [{"kind": "linear", "name": "enc1", "out_features": 3}, {"kind": "tanh"},
                         {"kind": "linear", "name": "out", "out_features": 1}], "loss": "binary_cross_entropy"},
    "train": {"rounds": 2, "batch_size": 32, "workers": 1},
    "policy": {"cipher_layers": ["enc1"], "reveals": {"enc1": {}}, "min_batch": 8, "trainer": "untrusted"},
    "report": {"plaintext_twin": False},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrusted-mode key holder, one owner's published bundle and its registered tags."""
    root = tmp_path_factory.mktemp("verified")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(160, len(FEATURES)))
    lines = ["id," + ",".join(FEATURES) + ",label"]
    lines += [f"p{i}," + ",".join(f"{v:.5f}" for v in x[i]) + f",{int(x[i, 0] > 0)}" for i in range(len(x))]
    (root / "table.csv").write_text("\n".join(lines) + "\n")
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    cfg = load_config(root / "config.yaml")[0]
    holder = KeyHolder.open_or_create(root / "kh", cfg.ckks.params(), cfg.policy, reveal_shapes(cfg))
    public = holder.public_context()
    manifest, tags = verified_owner.prepare(cfg, cfg.data.owners[0], public, holder.mac_key(), root / "exchange",
                                            root / "owner-local")
    holder.register_tags("clinic", tags)
    context = ckks.load_public_context(public, isolate=False)
    context.auto_rescale = False
    store = VerifiedStore(root / "exchange", cfg, holder.key_id)
    return cfg, holder, context, store


def _combination(context, store, chunk, weights, k, mask_output=None):
    """Σ_j W[j, k]·ct_j + M (the trainer's honest computation, or with another mask)."""
    acc = None
    for j, blob in enumerate(store.features(chunk)):
        term = ts.ckks_vector_from(context, blob).mul(float(weights[j, k]))
        acc = term if acc is None else acc.add_(term)
    mask = ts.ckks_vector_from(context, store.mask(chunk, k if mask_output is None else mask_output))
    return acc.add_(mask).serialize()


def _truth(cfg, chunk_index):
    """The owner's standardised training rows of a chunk (what the reveal must match)."""
    data = load_split(cfg, cfg.data.owners[0])
    return data.x["train"][verified_owner.chunks(len(data.x["train"]), cfg.ckks.params().slots)[chunk_index]]


def test_an_honest_combination_is_decrypted_and_matches_its_numpy_twin(setup):
    # Prepare
    cfg, holder, context, store = setup
    chunk = store.chunk_list("train")[0]
    weights = holder.input_weights("enc1")
    # Execute
    blob = _combination(context, store, chunk, weights, 0)
    response = holder.reveal_verified(verified.new_request(holder.key_id, "enc1", chunk.chunk, 0, blob))
    # Assert: within 6 σ of the flooding (σ ≈ 0.03) of X·W[:, 0]
    z = response.values[0] - store.mask_values(chunk)[0]
    assert z.shape == (chunk.n,)
    assert np.abs(z - _truth(cfg, 0) @ weights[:, 0]).max() < 6 * response.sigma + 1e-9
    assert response.sigma < 0.05


def test_the_error_of_a_verified_result_is_far_below_its_bound(setup):
    cfg, holder, context, store = setup
    chunk = store.chunk_list("train")[0]
    weights = holder.input_weights("enc1")
    secret = ts.context_from((Path(holder.directory) / "secret_context.bin").read_bytes())
    blob = _combination(context, store, chunk, weights, 2)
    exact = _truth(cfg, 0) @ weights[:, 2] + store.mask_values(chunk)[2]
    decrypted = np.asarray(ts.ckks_vector_from(secret, blob).decrypt())[: chunk.n]  # scoring only
    assert np.abs(decrypted - exact).max() < VERIFIED_ERROR_BOUND / 64


def test_each_output_of_a_chunk_is_revealed_once(setup):
    cfg, holder, context, store = setup
    chunk = store.chunk_list("test")[0]
    weights = holder.input_weights("enc1")
    holder.reveal_verified(verified.new_request(holder.key_id, "enc1", chunk.chunk, 1,
                                                _combination(context, store, chunk, weights, 1)))
    again = _combination(context, store, chunk, weights, 1)
    with pytest.raises(PolicyRefusal, match=r"already revealed under this key; each is revealed once"):
        holder.reveal_verified(verified.new_request(holder.key_id, "enc1", chunk.chunk, 1, again))


@pytest.mark.parametrize("forgery", ["unit_vector_weights", "another_mask", "raw_feature", "crafted_key_probe"])
def test_anything_but_the_declared_combination_is_refused_before_decryption(setup, forgery):
    # Prepare
    cfg, holder, context, store = setup
    chunk = store.chunk_list("train")[0]
    weights = holder.input_weights("enc1")
    used = holder.decryptions_used
    if forgery == "unit_vector_weights":  # the trainer's own W: e_0 picks feature 0 of every sample
        chosen = np.full_like(weights, 1e-6)
        chosen[0, 0] = 1.0
        blob = _combination(context, store, chunk, chosen, 0)
    elif forgery == "another_mask":
        blob = _combination(context, store, chunk, weights, 0, mask_output=1)
    elif forgery == "raw_feature":  # an owner ciphertext times 1, plus a genuine mask
        raw = ts.ckks_vector_from(context, store.features(chunk)[0]).mul(1.0)
        blob = raw.add_(ts.ckks_vector_from(context, store.mask(chunk, 0))).serialize()
    else:  # (0, Δ) at the verified level: the first half of the secret-key attack
        template = ring.read(_combination(context, store, chunk, weights, 0), cfg.ckks.params().slots)
        coeffs = np.zeros_like(template.coeffs)
        coeffs[1] = np.uint64(2**50)
        blob = ring.write(template, coeffs)
    # Execute / Assert
    with pytest.raises(PolicyRefusal, match=r"not the declared combination .* nothing was decrypted"):
        holder.reveal_verified(verified.new_request(holder.key_id, "enc1", chunk.chunk, 0, blob))
    assert holder.decryptions_used == used


def test_an_untrusted_key_holder_refuses_every_declared_reveal_so_the_key_attack_fails(setup):
    cfg, holder, context, store = setup
    template = ckks.multiply_plain(ckks.load_vector(context, ckks.encrypt(context, np.zeros(4096)),
                                                    ckks.fresh_layout(context)), np.ones(4096))
    result = key_attack.run(holder, template.serialize(), holder.key_id, 8192, [60, 50, 60], 2.0**50, "enc1", 64,
                            [f"{i:024x}" for i in range(64)], holder.public_context())
    assert not result.exact and result.recovered == 0
    assert result.refused.startswith("PolicyRefusal") and "policy.trainer is untrusted" in result.refused


def test_tags_are_fixed_once_registered(setup):
    cfg, holder, context, store = setup
    chunk = store.chunk_list("train")[0].chunk
    with pytest.raises(BundleError, match=rf"chunk '{chunk}' entry 0 was registered with another tag"):
        holder.register_tags("clinic", {chunk: {"n": store.chunks[chunk].n, "features": {"0": [1, 2]}}})


def test_a_chunk_without_tags_is_refused(setup):
    cfg, holder, context, store = setup
    chunk = store.chunk_list("train")[0]
    blob = _combination(context, store, chunk, holder.input_weights("enc1"), 0)
    with pytest.raises(PolicyRefusal, match=r"chunk 'train-0000' has no tags from the owners"):
        holder.reveal_verified(verified.new_request(holder.key_id, "enc1", "train-0000", 0, blob))


def test_the_weights_are_the_key_holders_and_stay_the_same_on_reopen(setup):
    cfg, holder, context, store = setup
    again = KeyHolder.open_or_create(holder.directory, cfg.ckks.params(), cfg.policy, reveal_shapes(cfg))
    assert np.array_equal(again.input_weights("enc1"), holder.input_weights("enc1"))
    assert holder.input_weights("enc1").shape == (len(FEATURES), 3)
