"""Per-operation CKKS costs on this machine, for the planner's cost model and the floor ratio.

Owns its own throwaway keys (it times decryption); it never touches a run's key holder.
"""

import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tenseal as ts

from hetrain.mpc_ops.crypto import ckks, wire
from hetrain.core.config import PolicyConfig
from hetrain.core.params import CkksParams
from hetrain.core.shapes import LinearShape
from hetrain.mpc_ops.reveal.protocol import RevealRequest, _mask
from hetrain.participants.key_holder import KeyHolder


def _median(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(params: CkksParams = CkksParams(), repeat: int = 15) -> dict:
    """Median seconds per operation, keyed like hetrain.mpc_ops.layers.planner.DEFAULT_COSTS."""
    slots = params.slots
    private = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    private.global_scale = 2.0**params.scale_bits
    private.generate_galois_keys()
    public = ckks.load_public_context(private.serialize(save_secret_key=False), isolate=False)  # our own bytes
    rng = np.random.default_rng(0)
    x = rng.normal(size=slots).clip(-4, 4)
    fresh = ckks.load_vector(public, ckks.encrypt(public, x), ckks.fresh_layout(public))
    product = ckks.multiply_plain(fresh, rng.normal(size=slots) * 0.01)
    blob = product.serialize()
    costs = {
        "mul_plain": _median(lambda: ckks.multiply_plain(fresh, rng.normal(size=slots)), repeat),
        "mul_scalar": _median(lambda: fresh.mul(0.37), repeat),
        "add": _median(lambda: product.add(product), repeat),
        "mask": _median(lambda: ckks.add_plain(product, _mask(slots, 64.0)), repeat),
        "serialize": _median(lambda: product.serialize(), repeat),
        "deserialize": _median(lambda: ts.ckks_vector_from(public, blob), repeat),
        "encrypt": _median(lambda: ckks.encrypt(public, x), repeat),
    }
    resized = ts.ckks_vector_from(public, wire.with_size(blob, 128, max_slots=slots))
    costs["rotate"] = _median(lambda: resized.sum(), repeat) / 7
    full = ts.ckks_vector_from(private, wire.with_size(blob, slots, max_slots=slots))
    costs["decrypt"] = _median(lambda: full.decrypt(), repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob.ct"
        path.write_bytes(ckks.encrypt(public, x))
        costs["read"] = _median(lambda: hashlib.sha256(path.read_bytes()).hexdigest(), repeat)
        costs["reveal_call"] = _reveal_call(Path(tmp), params, repeat, costs)
    return {k: round(v, 7) for k, v in costs.items()}


def _reveal_call(tmp: Path, params: CkksParams, repeat: int, costs: dict) -> float:
    """A key holder's per-request bookkeeping: a one-blob reveal minus its load and decryption."""
    policy = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}}, min_batch=1,
                          flooding={"security_bits": 30, "budget": 10**9})
    holder = KeyHolder.open_or_create(tmp / "kh", params, policy, {"enc1": LinearShape(64, 1)})
    public = ckks.load_public_context(holder.public_context(), isolate=False)  # our own key holder
    fresh = ckks.load_vector(public, ckks.encrypt(public, np.zeros(params.slots)), ckks.fresh_layout(public))
    blob = ckks.multiply_plain(fresh, np.ones(params.slots)).serialize()  # revealed blobs are products
    rows, weights = [f"{i:024x}" for i in range(128)], hashlib.sha256(b"w").hexdigest()

    def one():  # the same rows and weights each time: the ledger records, but no rank is added
        holder.reveal(RevealRequest("r", holder.key_id, "activation", "enc1", 0, [blob], [32], [128], 64,
                                    rows, weights))

    return max(0.0, _median(one, repeat) - costs["deserialize"] - costs["decrypt"])


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
