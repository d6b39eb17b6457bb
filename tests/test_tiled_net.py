"""The tiled circuit on ciphertext against its numpy twin, layer by layer; the key holder's strict rules.

Every decryption goes through KeyHolder.reveal (blinded, flooded). The test policies set
security_bits 0 and budget 64, so σ = sqrt(12·64)·B(depth) ≈ 8e-6 at depth 6: the tolerance
TOL = 1e-4 is about 12σ and far above the measured CKKS error (2^-23 ≈ 1e-7).
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from hetrain.engine import Model
from hetrain.mpc_ops.crypto import ckks
from hetrain.mpc_ops.layers.circuit import CipherOps, PlainOps, Val
from hetrain.configure import parse_config
from hetrain.mpc_ops.layers.depth_plan import chain_for_depth, circuit_depth
from hetrain.core.errors import PolicyRefusal, SecurityParameterError
from hetrain.core.shapes import reveal_shapes
from hetrain.mpc_ops.layers.polyact import fit
from hetrain.mpc_ops.reveal.protocol import blind, unblind
from hetrain.mpc_ops.crypto.tensors import EncryptedTensor
from hetrain.mpc_ops.layers.tiled import Tiling
from hetrain.mpc_ops.layers.tiled_net import Inputs, Reveal, build_net, plain_reveal, poly_derivative, poly_forward
from hetrain.participants.key_holder import KeyHolder

pytestmark = pytest.mark.integration  # TenSEAL keys

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4
N_BATCH = 64
ROWS = [f"{i:016x}" for i in range(N_BATCH)]


def load(name: str, **policy) -> dict:
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    raw["policy"]["flooding"] = {"security_bits": 0, "budget": 64}  # σ = sqrt(12·64)·B(6) ≈ 8e-6
    raw["policy"].update(policy)
    return raw


def holder_for(cfg, tmp: Path) -> tuple[KeyHolder, object]:
    holder = KeyHolder.open_or_create(tmp / "kh", cfg.ckks.params(), cfg.policy, reveal_shapes(cfg))
    return holder, ckks.load_public_context(holder.public_context(), expected_key_id=holder.key_id)


def through_key_holder(holder: KeyHolder, public, log: list):
    """The trainer's explicit reveal: blind, KeyHolder.reveal, unblind; records each reveal's depth."""
    def reveal(r: Reveal) -> np.ndarray:
        blobs = [v.v.serialize() for v in r.vals]
        enc = EncryptedTensor(kind=r.kind, layer=r.layer, shape=(r.count, len(blobs)), blobs=blobs,
                              stride=[r.stride] * len(blobs), counts=[r.count] * len(blobs),
                              placement=[(np.arange(r.count), c) for c in range(len(blobs))],
                              aggregate=r.aggregate, meta={"rows": ROWS[: r.aggregate if r.kind != "activation" else r.count],
                                                           "weights": "ab" * 32})
        request, masks = blind(enc, public, key_id=holder.key_id, round_no=1, mask_bound=64.0)
        log.append((r.kind, r.layer, max(v.depth for v in r.vals)))
        return unblind(enc, holder.reveal(request), masks)
    return reveal


def batch(rng, d: int, classes: int):
    x = rng.normal(size=(N_BATCH, d)).clip(-4, 4)
    y = rng.integers(0, max(2, classes), size=N_BATCH)
    return x, y


def inputs(ops, tiling: Tiling, x, y, classes: int, encrypted: bool, make) -> Inputs:
    enc = None
    if encrypted:
        enc = [make(tiling.rep((y == c).astype(float) if classes > 1 else y.astype(float))) for c in range(classes)]
    return Inputs(len(x), [make(tiling.rep(x[:, j])) for j in range(x.shape[1])], make(tiling.block(x)),
                  labels=y, enc_labels=enc, rows=ROWS)


def run_both(cfg, holder, public, seed=0):
    """One training step on ciphertext and on the twin from the same weights; returns both models' grads."""
    params = cfg.ckks.params()
    tiling = Tiling(params.slots, N_BATCH)
    classes = 1 if cfg.data.task == "binary" else cfg.data.num_classes
    x, y = batch(np.random.default_rng(seed), 30, classes)
    encrypted = cfg.policy.labels == "encrypted"
    out, log = {}, []
    for name in ("twin", "cipher"):
        model = Model(cfg)
        net = build_net(cfg, model, tiling)
        if name == "twin":
            ops = PlainOps(tiling.slots)
            reveal, make = plain_reveal(tiling), ops.secret
        else:
            ops = CipherOps(public)
            reveal = through_key_holder(holder, public, log)
            make = lambda v: Val(ckks.load_vector(public, ckks.encrypt(public, v), ckks.fresh_layout(public)), 0, True)  # noqa: E731
        outcome, z = net.step(ops, inputs(ops, tiling, x, y, classes, encrypted, make), reveal)
        out[name] = ({k: v.copy() for k, v in model.grads().items()}, outcome, z)
    return out, log


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    cfg = parse_config(load("breast_cancer_strict"))
    return cfg, *holder_for(cfg, tmp_path_factory.mktemp("strict"))


@pytest.fixture(scope="module")
def enc_labels(tmp_path_factory):
    cfg = parse_config(load("breast_cancer_encrypted_labels"))
    return cfg, *holder_for(cfg, tmp_path_factory.mktemp("enc"))


# ---- ciphertext against the twin ---------------------------------------------------------------

def test_strict_step_gradients_of_every_layer_match_the_numpy_twin(strict):
    # Prepare
    cfg, holder, public = strict

    # Execute
    out, log = run_both(cfg, holder, public)

    # Assert: per layer backward within TOL (sums over 64 samples of magnitude ~10)
    twin, cipher = out["twin"][0], out["cipher"][0]
    assert set(twin) == {"enc1.W", "enc1.b", "out.W", "out.b"}
    for key in twin:
        np.testing.assert_allclose(cipher[key], twin[key], rtol=0, atol=TOL, err_msg=key)
    # only gradients were revealed, at the depth the planner counted, within the chain
    assert [(k, layer) for k, layer, _ in log] == [("gradient", "out"), ("gradient", "enc1")]
    assert max(d for _, _, d in log) == circuit_depth(cfg) == cfg.ckks.params().depth == 6


def test_encrypted_label_step_matches_the_twin_in_activations_metrics_and_gradients(enc_labels):
    # Prepare
    cfg, holder, public = enc_labels

    # Execute
    out, log = run_both(cfg, holder, public, seed=1)

    # Assert: forward (revealed z1), metrics (loss sum, correct count), backward of both layers
    (tg, to, tz), (cg, co, cz) = out["twin"], out["cipher"]
    np.testing.assert_allclose(cz, tz, rtol=0, atol=TOL)
    assert co.correct == to.correct and co.loss == pytest.approx(to.loss, abs=1e-3)
    for key in tg:
        np.testing.assert_allclose(cg[key], tg[key], rtol=0, atol=TOL, err_msg=key)
    assert [k for k, _, _ in log] == ["activation", "metric", "gradient", "gradient"]
    assert max(d for _, _, d in log) == circuit_depth(cfg) == 2


def mixed_config():
    """Two ciphertext layers and a reveal after the second: 30 → 8 → square → 4 (revealed) → tanh → 1."""
    raw = load("breast_cancer_encrypted_labels", labels="reveal", cipher_layers=["enc1", "enc2"],
               reveals={"enc2": {"allow_invertible": False}})
    raw["model"]["layers"] = [{"kind": "linear", "name": "enc1", "out_features": 8}, {"kind": "square"},
                              {"kind": "linear", "name": "enc2", "out_features": 4}, {"kind": "tanh"},
                              {"kind": "linear", "name": "out", "out_features": 1}]
    return parse_config(raw)


def test_mixed_policy_reveals_after_the_second_ciphertext_layer_and_matches_the_twin(tmp_path):
    # Prepare
    cfg = mixed_config()
    holder, public = holder_for(cfg, tmp_path)

    # Execute
    out, log = run_both(cfg, holder, public, seed=2)

    # Assert: the revealed enc2 pre-activations and every layer's gradient agree with the twin
    (tg, _, tz), (cg, _, cz) = out["twin"], out["cipher"]
    np.testing.assert_allclose(cz, tz, rtol=0, atol=TOL)
    for key in tg:
        np.testing.assert_allclose(cg[key], tg[key], rtol=0, atol=TOL, err_msg=key)
    assert [(k, layer) for k, layer, _ in log] == [("activation", "enc2"), ("gradient", "enc2"), ("gradient", "enc1")]
    assert max(d for _, _, d in log) == circuit_depth(cfg) == 4 and cfg.ckks.poly_modulus_degree == 16384
    # the rank limit of the reveal point counts against the model's input (30 features), not enc2's 8 inputs
    assert reveal_shapes(cfg)["enc2"].in_features == 30


@pytest.mark.parametrize("kind, degree", [("square", None), ("poly_tanh", 3), ("poly_sigmoid", 3), ("poly_sigmoid", 1)])
def test_polynomial_activation_and_its_derivative_on_ciphertext_match_numpy(strict, kind, degree):
    # Prepare
    cfg, holder, public = strict
    poly = fit(kind, degree, 4.0)
    slots = cfg.ckks.params().slots
    z = np.random.default_rng(3).uniform(-4, 4, size=N_BATCH)
    vector = np.zeros(slots)
    vector[:N_BATCH] = z
    ops = CipherOps(public)
    ct = Val(ckks.load_vector(public, ckks.encrypt(public, vector), ckks.fresh_layout(public)), 0, True)
    reveal = through_key_holder(holder, public, [])

    # Execute: revealed as an aggregate-sized request of the 'out' layer (the harness's only allowed kind)
    derivative = poly_derivative(ops, poly, ct, 0.5)
    vals = [poly_forward(ops, poly, ct)] + ([derivative] if derivative.secret else [])
    values = reveal(Reveal("gradient", "out", vals, 1, N_BATCH, N_BATCH))

    # Assert (a degree-1 fit has a constant, public derivative: no ciphertext to reveal)
    np.testing.assert_allclose(values[:, 0], poly(z), rtol=0, atol=TOL)
    got = values[:, 1] if derivative.secret else np.asarray(derivative.v)[:N_BATCH]
    np.testing.assert_allclose(got, 0.5 * poly.derivative(z), rtol=0, atol=TOL)
    assert vals[0].depth == (1 if kind == "square" or poly.degree == 1 else 2)


# ---- the key holder's strict rules --------------------------------------------------------------

def _request(holder, public, kind: str, layer: str, count: int = N_BATCH):
    slots = holder.params.slots
    fresh = ckks.load_vector(public, ckks.encrypt(public, np.zeros(slots)), ckks.fresh_layout(public))
    blob = ckks.multiply_plain(fresh, np.ones(slots)).serialize()  # a revealed result is at least one product deep
    enc = EncryptedTensor(kind=kind, layer=layer, shape=(count, 1), blobs=[blob], stride=[1], counts=[count],
                          placement=[(np.arange(count), 0)], aggregate=count,
                          meta={"rows": ROWS[:count], "weights": "cd" * 32})
    return blind(enc, public, key_id=holder.key_id, round_no=1, mask_bound=64.0)[0]


def test_strict_key_holder_refuses_any_activation_reveal_as_undeclared(strict):
    cfg, holder, public = strict
    with pytest.raises(PolicyRefusal, match=r"policy rule 'undeclared_reveal_point' refused the reveal: layer 'enc1' "
                                            r"is not a declared reveal point \(allowed: \[\]\)") as exc_info:
        holder.reveal(_request(holder, public, "activation", "enc1"))
    assert exc_info.value.rule == "undeclared_reveal_point"


def test_metric_reveals_are_refused_unless_labels_are_encrypted(tmp_path):
    cfg = parse_config(load("breast_cancer_encrypted_labels", labels="reveal"))  # the depth-1 hybrid: a small key
    holder, public = holder_for(cfg, tmp_path)
    with pytest.raises(PolicyRefusal, match=r"a metric reveal \(aggregated loss and accuracy\) is only allowed under "
                                            r"policy.labels: encrypted; the policy has labels: reveal"):
        holder.reveal(_request(holder, public, "metric", "metrics"))


def test_gradient_reveal_of_a_small_batch_is_refused_in_strict_mode(strict):
    cfg, holder, public = strict
    with pytest.raises(PolicyRefusal, match=r"policy rule 'min_batch'.*aggregates 16 samples, fewer than "
                                            r"policy.min_batch=32"):
        holder.reveal(_request(holder, public, "gradient", "out", count=16))


def test_gradients_of_plaintext_layers_are_refused_when_labels_are_revealed(tmp_path):
    # Prepare: the hybrid policy with plaintext labels: only enc1's gradient is a ciphertext aggregate
    raw = load("breast_cancer_encrypted_labels", labels="reveal")
    cfg = parse_config(raw)
    holder, public = holder_for(cfg, tmp_path)
    with pytest.raises(PolicyRefusal, match=r"layer 'out' is not a ciphertext layer \(allowed: \['enc1'\]\)"):
        holder.reveal(_request(holder, public, "gradient", "out"))


# ---- depth and parameters ------------------------------------------------------------------------

@pytest.mark.parametrize("depth, n, bits", [(1, 8192, [60, 50, 60]), (2, 16384, [60, 50, 50, 60]),
                                            (6, 16384, [60] + [50] * 6 + [60])])
def test_the_planner_picks_the_smallest_ring_whose_security_bound_fits_the_depth(depth, n, bits):
    params = chain_for_depth(depth)
    assert (params.poly_modulus_degree, list(params.coeff_mod_bit_sizes), params.scale_bits) == (n, bits, 50)


def test_a_circuit_deeper_than_any_secure_chain_is_refused_naming_both_depths():
    with pytest.raises(SecurityParameterError, match=(
            r"^the ciphertext circuit needs multiplicative depth 7, but the deepest chain at scale 2\^50 within the "
            r"128-bit bound has 6 levels \(poly_modulus_degree=16384, 420 of 438 bits\)")):
        chain_for_depth(7)


def test_a_config_whose_circuit_is_too_deep_is_refused_at_load_time():
    # Prepare: strict digits-like multiclass with a degree-3 activation: depth 8
    raw = load("breast_cancer_strict")
    raw["data"]["task"], raw["data"]["num_classes"] = "multiclass", 3
    raw["model"]["loss"] = "softmax_cross_entropy"
    raw["model"]["layers"][2]["out_features"] = 3
    raw["policy"]["labels"] = "reveal"
    from hetrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"needs multiplicative depth 7, but the deepest chain .* has 6 levels"):
        parse_config(raw)


def test_strict_mode_needs_every_linear_layer_on_ciphertext():
    raw = load("breast_cancer_strict", cipher_layers=["enc1"])
    from hetrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"policy.reveals is empty \(strict mode: no activation is revealed\), so every "
                                          r"linear layer must be in policy.cipher_layers; missing \['out'\]"):
        parse_config(raw)


def test_a_non_polynomial_activation_below_a_ciphertext_layer_is_refused():
    raw = load("breast_cancer_strict")
    raw["model"]["layers"][1] = {"kind": "tanh"}
    from hetrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.layers\[1\]: 'tanh' sits below the ciphertext layer 'out'; only "
                                          r"polynomial activations \(square, poly_tanh, poly_sigmoid\) run on ciphertext"):
        parse_config(raw)


def test_config_parsing_leaves_the_raw_mapping_unchanged():
    raw = load("breast_cancer_strict")
    before = copy.deepcopy(raw)
    parse_config(raw)
    assert raw == before


@pytest.mark.parametrize("name, depth, bits", [
    ("breast_cancer_strict", 6, [60, 50, 50, 50, 50, 50, 50, 60]),
    ("breast_cancer_encrypted_labels", 2, [60, 50, 50, 60]),
    ("breast_cancer", 1, [60, 50, 60]),
])
def test_shipped_configs_load_with_a_chain_deep_enough_for_their_circuit(name, depth, bits):
    from hetrain.configure import load_config

    cfg, _ = load_config(REPO / "configs" / f"{name}.yaml")
    assert circuit_depth(cfg) == depth and cfg.ckks.coeff_mod_bit_sizes == bits
    assert cfg.ckks.params().depth >= depth


@pytest.mark.parametrize("n, sizes", [(1437, {62, 63}), (227, {56, 57}), (64, {64}), (65, {32, 33})])
def test_tiled_batches_are_balanced_and_never_wider_than_the_block(n, sizes):
    from hetrain.participants.tiled_owner import balanced_slices

    slices = balanced_slices(n, 64)
    assert {s.stop - s.start for s in slices} == sizes and slices[-1].stop == n and slices[0].start == 0


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"),
    (b" " * ((16 << 20) + 1), "the limit is 16777216 bytes"),
])
def test_the_tiled_store_reads_manifests_with_the_bounded_checks(demo_data, tmp_path, content, message):
    # Prepare: an owner's manifest in the exchange store that is not JSON, or too large to read
    from hetrain.configure import load_config
    from hetrain.core.errors import BundleError
    from hetrain.mpc_ops.exchange.tiled_bundle import TiledStore
    from hetrain.mpc_ops.layers.tiled import tiling_for
    from tests.test_policy_runs import config

    cfg = load_config(config(tmp_path, demo_data, "breast_cancer_strict"))[0]
    (tmp_path / "exchange" / "clinic_a").mkdir(parents=True)
    (tmp_path / "exchange" / "clinic_a" / "manifest.json").write_bytes(content)
    # Execute / Assert
    with pytest.raises(BundleError, match=f"owner 'clinic_a': manifest.*{message}"):
        TiledStore(tmp_path / "exchange", cfg, "k-0", tiling_for(cfg))
