"""CKKS parameters for the circuit a policy implies: count its depth, pick a chain, or refuse.

The depth is counted, not estimated: one training step of the configured network runs on the
numpy engine (mpc_ops/circuit.py), which charges a level exactly where the ciphertext engine
rescales. The chain is then [60, 50 × depth, 60] at scale 2^50 (10 bits of headroom above the
scale in the last prime, a 60-bit special prime), in the smallest ring whose 128-bit bound
admits it: N = 8192 up to depth 1 (170 of 218 bits), N = 16384 up to depth 6 (420 of 438).
"""

import numpy as np

from hetrain.core.errors import SecurityParameterError
from hetrain.mpc_ops.crypto.params import MAX_MODULUS_BITS, CkksParams

SCALE_BITS = 50
EDGE_BITS = 60
MAX_DEPTH = {n: (MAX_MODULUS_BITS[n] - 2 * EDGE_BITS) // SCALE_BITS for n in (8192, 16384)}


def uses_tiled(cfg) -> bool:
    """Whether the run needs the tiled engine (see policy_uses_tiled); the one test of it."""
    return policy_uses_tiled(cfg.policy)


def policy_uses_tiled(policy) -> bool:
    """Whether a policy needs the tiled engine: more than the first layer on ciphertext (config validation
    makes cipher_layers a prefix of the model), no activation reveal (strict), or encrypted labels.
    Otherwise the depth-1 hybrid path runs. The key holder, which sees only the policy, asks this too."""
    return len(policy.cipher_layers) > 1 or not policy.reveals or policy.labels == "encrypted"


def block_width(batch_size: int) -> int:
    return 1 << max(0, batch_size - 1).bit_length()


def circuit_depth(cfg) -> int:
    """Levels one training step consumes (the deepest revealed value), counted on the numpy engine."""
    if not uses_tiled(cfg):
        return 1
    from hetrain.engine import Model  # the trainer's model definition: the same layers as a run

    from hetrain.mpc_ops.layers.circuit import PlainOps
    from hetrain.mpc_ops.layers.tiled import Tiling
    from hetrain.mpc_ops.layers.tiled_net import Inputs, build_net

    model = Model(cfg)
    n = block_width(cfg.train.batch_size)
    widths = [layer.W.shape[0] for layer in [model.input] + list(model.body.layers) if hasattr(layer, "W")]
    tiling = Tiling(n * (1 << max(widths).bit_length()), n)
    ops, rng = PlainOps(tiling.slots), np.random.default_rng(0)
    m, d = n, widths[0]
    x = rng.uniform(-1, 1, size=(m, d))
    classes = 1 if cfg.data.task == "binary" else cfg.data.num_classes
    y = rng.integers(0, max(2, classes), size=m)
    enc = None
    if cfg.policy.labels == "encrypted":
        enc = [ops.secret(tiling.rep((y == c).astype(float) if classes > 1 else y)) for c in range(classes)]
    inputs = Inputs(m, [ops.secret(tiling.rep(x[:, j])) for j in range(d)], ops.secret(tiling.block(x)),
                    labels=y, enc_labels=enc)
    deepest = [0]

    def reveal(r):
        deepest[0] = max([deepest[0]] + [v.depth for v in r.vals])
        return np.stack([np.asarray(v.v)[: r.stride * r.count : r.stride] for v in r.vals], axis=1)

    build_net(cfg, model, tiling).step(ops, inputs, reveal)
    return deepest[0]


def chain_for_depth(depth: int) -> CkksParams:
    """[60, 50 × depth, 60] at scale 2^50 in the smallest ring that admits it, or a refusal naming both depths."""
    for n in (8192, 16384):
        if depth <= MAX_DEPTH[n]:
            return CkksParams(n, (EDGE_BITS,) + (SCALE_BITS,) * depth + (EDGE_BITS,), SCALE_BITS).validate(depth)
    raise SecurityParameterError(
        f"the ciphertext circuit needs multiplicative depth {depth}, but the deepest chain at scale 2^{SCALE_BITS} "
        f"within the 128-bit bound has {MAX_DEPTH[16384]} levels (poly_modulus_degree=16384, "
        f"{2 * EDGE_BITS + SCALE_BITS * MAX_DEPTH[16384]} of {MAX_MODULUS_BITS[16384]} bits); put fewer layers "
        f"in policy.cipher_layers or declare a reveal point")
