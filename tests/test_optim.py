"""Optimizers: hand-computed steps, exact checkpoint resume, hyperparameter validation."""

import numpy as np
import pytest

from hetrain.mpc_ops.layers.optim import SGD, Adam, build_optimizer
from hetrain.mpc_ops.layers.plain_layers import BinaryCrossEntropy, Linear, Sequential, Tanh


def test_sgd_without_momentum_steps_against_the_gradient():
    # Prepare
    params, grads = {"w": np.array([1.0, -2.0])}, {"w": np.array([0.5, -1.0])}

    # Execute
    SGD(lr=0.1).step(params, grads)

    # Assert: p - lr*g
    np.testing.assert_allclose(params["w"], [0.95, -1.9], rtol=1e-15)


def test_sgd_with_momentum_matches_two_hand_computed_steps():
    # Prepare
    w = np.array([1.0])
    params, grads = {"w": w}, {"w": np.array([0.5])}
    opt = SGD(lr=0.1, momentum=0.9)

    # Execute / Assert: v1 = 0.5, p1 = 1 - 0.1*0.5 = 0.95
    opt.step(params, grads)
    assert w[0] == pytest.approx(0.95, abs=1e-15)
    # v2 = 0.9*0.5 + 0.5 = 0.95, p2 = 0.95 - 0.1*0.95 = 0.855
    opt.step(params, grads)
    assert w[0] == pytest.approx(0.855, abs=1e-15)
    assert params["w"] is w  # updated in place


def test_adam_matches_two_hand_computed_steps():
    # Prepare
    w = np.array([1.0])
    opt = Adam(lr=0.1)

    # Execute / Assert
    # t=1, g=0.5: m=0.05, v=0.00025, m_hat=0.5, v_hat=0.25; p = 1 - 0.1*0.5/(0.5+1e-8)
    opt.step({"w": w}, {"w": np.array([0.5])})
    assert w[0] == pytest.approx(1.0 - 0.05 / (0.5 + 1e-8), abs=1e-15)
    assert w[0] == pytest.approx(0.900000002, abs=1e-12)
    # t=2, g=-1: m=0.045-0.1=-0.055, v=0.00024975+0.001=0.00124975,
    # m_hat=-0.055/0.19=-0.2894736842, v_hat=0.00124975/0.001999=0.6251875938
    # p = 0.900000002 + 0.1*0.2894736842/(0.7906880509+1e-8)
    opt.step({"w": w}, {"w": np.array([-1.0])})
    assert w[0] == pytest.approx(0.9366103542, abs=1e-10)
    assert opt.t == 2


def test_step_updates_layer_weights_seen_by_the_layer():
    # Prepare
    layer = Linear(2, 1, np.random.default_rng(0), "fc")
    W_before = layer.W.copy()
    grads = {"W": np.ones((2, 1)), "b": np.ones(1)}

    # Execute
    Adam(lr=0.01).step(layer.parameters(), grads)

    # Assert: Adam's first step moves every entry by lr (up to eps)
    np.testing.assert_allclose(layer.W, W_before - 0.01, rtol=1e-6)
    np.testing.assert_allclose(layer.b, [-0.01], rtol=1e-6)


def run_steps(opt, params, grad_seq):
    for g in grad_seq:
        opt.step(params, {k: g * (i + 1) for i, k in enumerate(params)})


@pytest.mark.parametrize("kind, kwargs", [
    ("sgd", {"lr": 0.05, "momentum": 0.9}), ("sgd", {"lr": 0.05}), ("adam", {"lr": 0.01, "beta1": 0.8}),
])
def test_state_dict_roundtrip_resumes_bit_identically(kind, kwargs, tmp_path):
    # Prepare: the same 6 gradients, once straight through, once with a save/restore after 3
    rng = np.random.default_rng(1)
    grad_seq = [rng.normal(size=(3, 2)) for _ in range(6)]
    start = {"fc.W": rng.normal(size=(3, 2)), "fc.b": rng.normal(size=(3, 2))}
    straight = {k: v.copy() for k, v in start.items()}
    resumed = {k: v.copy() for k, v in start.items()}
    run_steps(build_optimizer(kind, **kwargs), straight, grad_seq)

    # Execute: save through np.savez, as a checkpoint would, into a fresh optimizer
    first = build_optimizer(kind, **kwargs)
    run_steps(first, resumed, grad_seq[:3])
    np.savez(tmp_path / "opt.npz", **first.state_dict())
    second = build_optimizer(kind, lr=1.0)
    with np.load(tmp_path / "opt.npz") as saved:
        second.load_state_dict(dict(saved))
    run_steps(second, resumed, grad_seq[3:])

    # Assert
    for key in start:
        np.testing.assert_array_equal(resumed[key], straight[key])
    assert second.state_dict().keys() == first.state_dict().keys()


def test_state_dict_returns_copies_not_live_buffers():
    # Prepare
    opt, w = Adam(lr=0.1), np.array([1.0])
    opt.step({"w": w}, {"w": np.array([0.5])})

    # Execute
    state = opt.state_dict()
    opt.step({"w": w}, {"w": np.array([0.5])})

    # Assert
    assert state["t"] == 1
    assert state["m.w"][0] == pytest.approx(0.05)


def test_load_state_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"SGD.load_state_dict: unexpected key 'm.w'"):
        SGD(lr=0.1).load_state_dict({"lr": 0.1, "momentum": 0.0, "m.w": np.zeros(1)})


def test_load_state_dict_rejects_missing_keys():
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: missing keys \['t'\]"):
        Adam(lr=0.1).load_state_dict({"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8})


@pytest.mark.parametrize("cls, kwargs, match", [
    (Adam, {"lr": -1.0}, r"^The 'lr' parameter of Adam must be a float > 0\. Got -1\.0 instead\.$"),
    (Adam, {"lr": 0.1, "beta1": 1.0}, r"'beta1' parameter of Adam must be a float in the range \[0, 1\)\. Got 1\.0"),
    (Adam, {"lr": 0.1, "beta2": -0.1}, r"'beta2' parameter of Adam .* Got -0\.1 instead"),
    (Adam, {"lr": 0.1, "eps": 0.0}, r"'eps' parameter of Adam must be a float > 0\. Got 0\.0"),
    (SGD, {"lr": 0.0}, r"^The 'lr' parameter of SGD must be a float > 0\. Got 0\.0 instead\.$"),
    (SGD, {"lr": float("nan")}, r"'lr' parameter of SGD must be a float > 0\. Got nan"),
    (SGD, {"lr": "0.1"}, r"'lr' parameter of SGD must be a float > 0\. Got '0\.1'"),
    (SGD, {"lr": 0.1, "momentum": 1.0}, r"'momentum' parameter of SGD must be a float in the range \[0, 1\)\. Got 1\.0"),
    (SGD, {"lr": 0.1, "momentum": -0.5}, r"'momentum' parameter of SGD .* Got -0\.5 instead"),
])
def test_bad_hyperparameters_raise_naming_parameter_range_and_value(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_build_optimizer_rejects_unknown_kind_listing_allowed():
    with pytest.raises(ValueError, match=r"^optimizer 'rmsprop' is not supported; allowed: adam, sgd$"):
        build_optimizer("rmsprop", lr=0.1)


def test_step_rejects_missing_gradient_naming_the_parameter():
    with pytest.raises(ValueError, match=r"Adam.step: no gradient for parameter 'fc.b'"):
        Adam(lr=0.1).step({"fc.W": np.zeros(2), "fc.b": np.zeros(1)}, {"fc.W": np.zeros(2)})


def test_tiny_mlp_with_bce_and_adam_learns_xor():
    # Prepare
    rng = np.random.default_rng(42)
    x = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = np.array([0, 1, 1, 0])
    x_before = x.copy()
    model = Sequential([Linear(2, 8, rng, "fc1"), Tanh(), Linear(8, 1, rng, "fc2")])
    loss, opt = BinaryCrossEntropy(), Adam(lr=0.05)

    # Execute
    first = loss.forward(model.forward(x), y)
    for _ in range(300):
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        opt.step(model.parameters(), model.grads())
    last = loss.forward(model.forward(x), y)

    # Assert
    np.testing.assert_array_equal(loss.predict(model.forward(x)), y)
    assert last < 0.1 * first
    np.testing.assert_array_equal(x, x_before)
