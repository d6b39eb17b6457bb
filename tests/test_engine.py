"""The training step's freeze: once the rank limit allows no new weights for the ciphertext layer,
its weights stop, its gradient is no longer revealed, and its revealed outputs are reused."""

import numpy as np
import pytest
import yaml

from hetrain.engine import LazyBatch, Learner, Model, input_frozen_in, make_optimizer
from hetrain.mpc_ops.layers.cipher_layers import PlainInputLinear
from hetrain.configure import load_config, parse_config
from hetrain.core.errors import ConfigError
from hetrain.mpc_ops.reveal.policy import input_train_rounds
from hetrain.mpc_ops.crypto.tensors import PlainBatch

from conftest import REPO


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name, h, max_rank, rounds", [
    ("breast_cancer", 5, None, 4),   # floor(29 / 5) = 5 distinct weights: 4 training rounds + the frozen one
    ("breast_cancer", 8, None, 2),   # floor(29 / 8) = 3
    ("breast_cancer", 5, 10, 1),     # floor(10 / 5) = 2
    ("breast_cancer", 5, 5, 0),      # one reveal only: the layer never trains
    ("digits_vertical", 20, None, 2),  # floor(63 / 20) = 3
])
def test_input_train_rounds_follow_the_rank_limit(name, h, max_rank, rounds):
    raw = shipped(name)
    raw["model"]["layers"][0]["out_features"] = h
    raw["policy"]["reveals"]["enc1"]["max_rank"] = max_rank
    assert input_train_rounds(parse_config(raw)) == rounds


def test_allow_invertible_never_freezes():
    raw = shipped("breast_cancer")
    raw["policy"]["reveals"]["enc1"] = {"allow_invertible": True}
    assert input_train_rounds(parse_config(raw)) is None
    assert not input_frozen_in(None, 10_000)
    assert input_frozen_in(4, 4) and input_frozen_in(4, 5) and not input_frozen_in(4, 3)  # rounds trained before


@pytest.mark.parametrize("max_rank", [4, 30])
def test_max_rank_outside_out_features_to_in_features_is_refused(max_rank):
    raw = shipped("breast_cancer")
    raw["policy"]["reveals"]["enc1"]["max_rank"] = max_rank
    with pytest.raises(ConfigError, match=(r"cfg.yaml: key '\(top level\)': policy.reveals.enc1.max_rank must be in \[5, 29\] "
                                           rf".*; got {max_rank}")):
        parse_config(raw, "cfg.yaml")


def _learner(cfg, calls):
    model = Model(cfg)
    front = PlainInputLinear("enc1", model.input.W)

    def reveal(value):
        calls.append(value.shape)
        return value
    return Learner(model, make_optimizer(cfg), front, reveal, cache_frozen=True)


def test_a_frozen_learner_keeps_its_weights_reveals_no_gradient_and_reuses_outputs():
    # Prepare
    cfg, _ = load_config(REPO / "configs" / "breast_cancer.yaml")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 30)), rng.integers(0, 2, 64)
    calls = []
    learner = _learner(cfg, calls)
    learner.train_batch(PlainBatch("b0", x), y)
    assert len(calls) == 2  # forward and gradient reveal
    learner.freeze_input()
    W, b, out_W = learner.model.input.W.copy(), learner.model.input.b.copy(), learner.model.parameters()["out.W"].copy()
    loads = []

    def load():
        loads.append(1)
        return PlainBatch("b0", x)

    # Execute: two frozen steps on the same batch, given lazily
    learner.train_batch(LazyBatch("b0", load), y)
    learner.train_batch(LazyBatch("b0", load), y)

    # Assert: one forward reveal (then the cache), no gradient reveal, W fixed, the rest trains
    assert len(calls) == 3 and calls[2] == (64, 5)
    assert len(loads) == 1
    np.testing.assert_array_equal(learner.model.input.W, W)
    assert not np.array_equal(learner.model.input.b, b)
    assert not np.array_equal(learner.model.parameters()["out.W"], out_W)
    np.testing.assert_array_equal(learner.frozen_cache["b0"], x @ W)


def test_a_delta_column_over_fewer_than_min_batch_samples_is_zeroed_before_its_gradient_reveal():
    # Prepare: δ columns with 1 (one-hot), 31 and 32 non-zero rows, and a dense one; min_batch 32
    cfg, _ = load_config(REPO / "configs" / "breast_cancer.yaml")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 30)), rng.integers(0, 2, 64)
    model = Model(cfg)
    seen = []

    class RecordingFront(PlainInputLinear):
        def backward(self, grad_out):
            seen.append(grad_out.copy())
            return super().backward(grad_out)

    crafted = rng.normal(size=(64, 5))
    crafted[:, 0] = 0.0
    crafted[7, 0] = 1.0
    crafted[31:, 1] = 0.0
    crafted[32:, 2] = 0.0
    learner = Learner(model, make_optimizer(cfg), RecordingFront("enc1", model.input.W), lambda v: v,
                      min_rows=cfg.policy.min_batch)
    model.body.backward = lambda grad: crafted

    # Execute
    learner.train_batch(PlainBatch("b0", x), y)

    # Assert: the two sparse columns were zeroed, the others reach the reveal unchanged
    (delta,) = seen
    assert cfg.policy.min_batch == 32
    np.testing.assert_array_equal(delta[:, :2], 0.0)
    np.testing.assert_array_equal(delta[:, 2:], crafted[:, 2:])
    np.testing.assert_array_equal(learner.model.input.grad_W[:, :2], 0.0)
