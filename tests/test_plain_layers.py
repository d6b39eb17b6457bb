"""Plaintext layers and losses: analytic gradients against central finite differences."""

import numpy as np
import pytest

from hetrain.mpc_ops.layers.plain_layers import (
    BinaryCrossEntropy, Linear, ReLU, Sequential, Sigmoid, SoftmaxCrossEntropy, Tanh, build_activation,
)

RTOL, ATOL, STEP = 1e-5, 1e-8, 1e-6  # float64 central differences: error ~ STEP**2


def numeric_grad(f, x: np.ndarray) -> np.ndarray:
    """Central finite differences of the scalar f() w.r.t. every entry of x, perturbed in place."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + STEP
        plus = f()
        x[i] = saved - STEP
        minus = f()
        x[i] = saved
        grad[i] = (plus - minus) / (2 * STEP)
    return grad


def away_from_zero(rng, shape):
    """Inputs with |x| >= 0.1, so the ReLU kink never sits inside a finite-difference step."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 2.0, size=shape)


def make_layer(kind: str, rng):
    """A layer mapping (n, 4) to (n, 3) or (n, 4)."""
    if kind == "sequential":
        return Sequential([Linear(4, 5, rng, "fc1"), Tanh(), Linear(5, 3, rng, "fc2")])
    return Linear(4, 3, rng, "fc") if kind == "linear" else build_activation(kind)


@pytest.mark.parametrize("kind", ["linear", "relu", "tanh", "sigmoid", "sequential"])
def test_layer_backward_matches_finite_differences(kind):
    # Prepare: L = sum(forward(x) * R) has dL/dy = R
    rng = np.random.default_rng(0)
    layer, x = make_layer(kind, rng), away_from_zero(rng, (5, 4))
    r = rng.normal(size=layer.forward(x).shape)

    def loss():
        return float((layer.forward(x) * r).sum())

    # Execute
    layer.forward(x)
    grad_x = layer.backward(r)
    grads = {k: v.copy() for k, v in layer.grads().items()}

    # Assert
    np.testing.assert_allclose(grad_x, numeric_grad(loss, x), rtol=RTOL, atol=ATOL)
    for key, param in layer.parameters().items():
        np.testing.assert_allclose(grads[key], numeric_grad(loss, param), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss_cls, n_out", [(SoftmaxCrossEntropy, 3), (BinaryCrossEntropy, 1)])
def test_loss_backward_matches_finite_differences(loss_cls, n_out):
    # Prepare
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(6, n_out))
    y = rng.integers(0, max(n_out, 2), size=6)
    loss = loss_cls()

    # Execute
    loss.forward(logits, y)
    grad = loss.backward()

    # Assert
    expected = numeric_grad(lambda: loss.forward(logits, y), logits)
    np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)


def test_softmax_cross_entropy_matches_textbook_formula():
    # Prepare
    logits, y = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]), np.array([2, 0])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    # Execute
    loss = SoftmaxCrossEntropy()
    value = loss.forward(logits, y)

    # Assert
    assert value == pytest.approx(-(np.log(p[0, 2]) + np.log(p[1, 0])) / 2, rel=1e-12)
    np.testing.assert_allclose(loss.backward(), (p - np.eye(3)[y]) / 2, rtol=1e-12)
    np.testing.assert_array_equal(loss.predict(logits), [2, 0])


def test_binary_cross_entropy_matches_textbook_formula():
    # Prepare
    z, y = np.array([[0.3], [-1.2], [2.0]]), np.array([1, 0, 0])
    s = 1.0 / (1.0 + np.exp(-z[:, 0]))

    # Execute
    loss = BinaryCrossEntropy()
    value = loss.forward(z, y)

    # Assert
    assert value == pytest.approx(-np.mean(y * np.log(s) + (1 - y) * np.log(1 - s)), rel=1e-12)
    np.testing.assert_allclose(loss.backward()[:, 0], (s - y) / 3, rtol=1e-12)
    np.testing.assert_array_equal(loss.predict(z), [1, 0, 1])


@pytest.mark.parametrize("loss_cls, logits, y, expected", [
    (BinaryCrossEntropy, np.array([[1000.0], [-1000.0], [1000.0], [-1000.0]]), np.array([1, 0, 0, 1]), 500.0),
    (SoftmaxCrossEntropy, np.array([[1000.0, -1000.0], [-1000.0, 1000.0]]), np.array([0, 0]), 1000.0),
])
def test_losses_stay_finite_for_logits_of_plus_minus_1000(loss_cls, logits, y, expected):
    # Prepare
    loss = loss_cls()

    # Execute: raise on overflow, divide-by-zero or nan instead of warning
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        value = loss.forward(logits, y)
        grad = loss.backward()

    # Assert: two of four samples cost 1000 each (BCE); one of two (CE)
    assert value == pytest.approx(expected)
    assert np.isfinite(grad).all()


def test_sigmoid_stays_finite_for_inputs_of_plus_minus_1000():
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        y = Sigmoid().forward(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("kind", ["linear", "relu", "tanh", "sigmoid", "sequential"])
def test_layer_forward_and_backward_leave_inputs_unchanged(kind):
    # Prepare
    rng = np.random.default_rng(3)
    layer, x = make_layer(kind, rng), rng.normal(size=(5, 4))
    x_before = x.copy()

    # Execute
    g = np.ones_like(layer.forward(x))
    g_before = g.copy()
    layer.backward(g)

    # Assert
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(g, g_before)


@pytest.mark.parametrize("loss_cls, n_out", [(SoftmaxCrossEntropy, 3), (BinaryCrossEntropy, 1)])
def test_loss_forward_leaves_logits_and_labels_unchanged(loss_cls, n_out):
    # Prepare
    logits, y = np.random.default_rng(4).normal(size=(4, n_out)), np.array([0, 1, 0, 1])
    logits_before, y_before = logits.copy(), y.copy()

    # Execute
    loss = loss_cls()
    loss.forward(logits, y)
    loss.backward()

    # Assert
    np.testing.assert_array_equal(logits, logits_before)
    np.testing.assert_array_equal(y, y_before)


def test_linear_init_is_glorot_uniform_with_zero_bias():
    layer = Linear(300, 100, np.random.default_rng(5), "fc")
    limit = np.sqrt(6 / 400)
    assert layer.W.shape == (300, 100) and np.abs(layer.W).max() <= limit
    assert np.abs(layer.W).max() > 0.99 * limit  # the whole range is used, not a narrower one
    np.testing.assert_array_equal(layer.b, np.zeros(100))


def test_linear_load_copies_into_the_existing_arrays():
    # Prepare
    layer = Linear(2, 3, np.random.default_rng(6), "fc")
    W_obj, new = layer.W, {"W": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}

    # Execute
    layer.load(new)
    new["W"][0, 0] = 99.0

    # Assert: same array object (optimizers keep it), values copied (later edits don't leak)
    assert layer.W is W_obj
    np.testing.assert_array_equal(layer.W, np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(layer.b, np.ones(3))


def test_linear_load_rejects_wrong_shape_naming_layer_and_shapes():
    layer = Linear(2, 3, np.random.default_rng(7), "enc1")
    W_before = layer.W.copy()
    with pytest.raises(ValueError, match=r"layer 'enc1': parameter 'W' must have shape \(2, 3\); got \(3, 2\)"):
        layer.load({"W": np.zeros((3, 2)), "b": np.zeros(3)})
    np.testing.assert_array_equal(layer.W, W_before)


def test_sequential_prefixes_parameter_keys_with_layer_names():
    rng = np.random.default_rng(9)
    model = Sequential([Linear(2, 4, rng, "fc1"), ReLU(), Linear(4, 1, rng, "fc2")])
    assert list(model.parameters()) == ["fc1.W", "fc1.b", "fc2.W", "fc2.b"]
    assert model.parameters()["fc2.W"] is model.layers[2].W


def make_rng():
    return np.random.default_rng(10)


@pytest.mark.parametrize("call, match", [
    (lambda: Linear(2, 3, make_rng(), "fc").forward(np.zeros((4, 5))),
     r"layer 'fc': input must have shape \(n, 2\); got \(4, 5\)"),
    (lambda: Linear(0, 3, make_rng(), "fc"), r"The 'in_features' parameter of Linear 'fc' must be an int >= 1\. Got 0"),
    (lambda: Sequential([Linear(2, 2, make_rng(), "fc"), Linear(2, 2, make_rng(), "fc")]),
     r"layer names must be unique; repeated: \['fc'\]"),
    (lambda: build_activation("gelu"), r"^activation 'gelu' is not supported; allowed: relu, sigmoid, tanh$"),
    (lambda: SoftmaxCrossEntropy().forward(np.zeros((2, 3)), np.array([0, 3])),
     r"labels must be integers in \[0, 2\]; got dtype \w+, range \[0, 3\]"),
    (lambda: BinaryCrossEntropy().forward(np.zeros((2, 1)), np.array([0, 2])), r"labels be 0 or 1"),
    (lambda: BinaryCrossEntropy().forward(np.zeros((3, 1)), np.array([0, 1])),
     r"labels shape \(n,\) with n >= 1; got logits \(3, 1\), labels \(2,\)"),
])
def test_bad_inputs_raise_value_error_saying_what_is_allowed(call, match):
    with pytest.raises(ValueError, match=match):
        call()
