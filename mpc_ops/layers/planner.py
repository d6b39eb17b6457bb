"""The packing planner: count the CKKS operations each candidate layout needs, price them with
per-op costs (defaults measured on this project's 2-core machine, recalibrated by `hetrain bench`),
and pick the cheapest executable layout for the ciphertext layer.

Candidates for the forward product X·W:
  rows    sample-major segments; per output, one ct×plain and log2(seg) rotations per chunk
  column  one ciphertext per feature; per output, d ct×scalar and no rotation
Candidates for the gradient X^T·δ (summed over the batch inside the ciphertext):
  cols        feature-major segments; per output and owner, one ct×plain per chunk, then one
              rotate-and-sum of log2(T) rotations: several products packed before one sum
  column_sum  column layout; per feature and output, a ct×plain and a full-batch rotate-and-sum,
              and one decryption each (modelled, not executable: never cheaper here)
  replicated  one ciphertext per sample with its row tiled h times; the gradient needs no
              rotation but one ct×plain per sample (modelled, not executable: never cheaper here)
"""

import math
from collections import Counter
from dataclasses import dataclass, field

from hetrain.core import shapes
from hetrain.mpc_ops.layers.packing import PackingPlan, next_pow2

# Seconds per operation on this project's machine (TenSEAL 0.3.18, N=8192, one core), measured by
# bench/microbench.py; `hetrain bench` re-measures them and re-plans with its own numbers.
DEFAULT_COSTS = {
    "mul_plain": 1.25e-3,  # ct × plain vector, including encoding the vector
    "mul_scalar": 0.52e-3,
    "rotate": 1.4e-3,  # one rotation + add inside TenSEAL's sum
    "add": 0.03e-3,
    "mask": 1.2e-3,  # trainer: draw a mask from os.urandom and add it as a plain vector
    "decrypt": 0.75e-3,
    "serialize": 0.45e-3,
    "deserialize": 0.12e-3,
    "read": 0.45e-3,  # read one ~250 KB blob from the exchange store and check its SHA-256
    "reveal_call": 2.0e-3,  # key holder bookkeeping per request: audit line, state fsync, flooding
}


@dataclass(frozen=True)
class PackingShape:
    """The hybrid's ciphertext layer as the planner sees it: which owners meet in one batch."""

    owners: tuple[int, ...]  # feature count per owner whose ciphertexts meet in one batch
    out_features: int
    batch: int  # samples per training batch
    slots: int


def packing_shape(cfg) -> PackingShape:
    """The configured first (ciphertext) layer's PackingShape."""
    first = cfg.model.layers[0]
    return PackingShape(shapes.owner_widths(cfg), first.out_features, cfg.train.batch_size, shapes.slots(cfg))


@dataclass
class Candidate:
    forward: str
    gradient: str
    counts: Counter
    seconds: float = 0.0
    executable: bool = True


@dataclass
class Plan:
    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    costs: dict = field(default_factory=dict)

    def packing(self, shape: PackingShape) -> PackingPlan:
        return PackingPlan(slots=shape.slots, seg=next_pow2(max(shape.owners)), forward=self.chosen.forward)

    def table(self) -> list[dict]:
        return [{"forward": c.forward, "gradient": c.gradient, "executable": c.executable,
                 "predicted_seconds_per_batch": round(c.seconds, 5), "chosen": c is self.chosen,
                 **{f"n_{k}": v for k, v in sorted(c.counts.items())}} for c in self.candidates]


def _reveal(counts: Counter, blobs: int, requests: int = 1) -> None:
    """Trainer masks and ships `blobs` ciphertexts; the key holder loads and decrypts each."""
    counts["deserialize"] += 2 * blobs  # trainer re-loads to mask, key holder loads
    counts["mask"] += blobs
    counts["serialize"] += blobs
    counts["decrypt"] += blobs
    counts["reveal_call"] += requests


def _segment_sum(counts: Counter, width: int) -> None:
    counts["rotate"] += int(math.log2(width))
    counts["serialize"] += 2  # resize trick (hetrain.mpc_ops.crypto.wire): out and back
    counts["deserialize"] += 2


def forward_counts(layout: str, shape: PackingShape, n: int) -> Counter:
    """Operations of one forward pass over an n-sample batch, reveal included."""
    c = Counter()
    owners, h, slots = shape.owners, shape.out_features, shape.slots
    if layout == "rows":
        seg = next_pow2(max(owners))
        chunks = math.ceil(n / (slots // seg))
        c["read"] += chunks * len(owners)
        c["deserialize"] += chunks * len(owners)
        c["mul_plain"] += h * chunks * len(owners)
        c["add"] += h * chunks * (len(owners) - 1)
        for _ in range(h * chunks):
            _segment_sum(c, seg)
        c["serialize"] += h * chunks
        _reveal(c, h * chunks)
    elif layout == "column":
        chunks, d = math.ceil(n / slots), sum(owners)
        c["read"] += chunks * d
        c["deserialize"] += chunks * d
        c["mul_scalar"] += h * chunks * d
        c["add"] += h * chunks * (d - 1)
        c["serialize"] += h * chunks
        _reveal(c, h * chunks)
    else:
        raise ValueError(f"forward layout must be 'rows' or 'column', got {layout!r}")
    return c


def gradient_counts(layout: str, shape: PackingShape, n: int) -> Counter:
    """Operations of one gradient X^T·δ over an n-sample batch, reveal included."""
    c = Counter()
    owners, h, slots = shape.owners, shape.out_features, shape.slots
    seg = next_pow2(max(owners))
    if layout == "cols":
        chunks, t = math.ceil(n / (slots // seg)), slots // seg
        c["read"] += chunks * len(owners)
        c["deserialize"] += chunks * len(owners)
        c["mul_plain"] += h * chunks * len(owners)
        c["add"] += h * (chunks - 1) * len(owners)
        for _ in range(h * len(owners)):
            _segment_sum(c, t)
        c["serialize"] += h * len(owners)
        _reveal(c, h * len(owners))
    elif layout == "column_sum":
        d, width = sum(owners), next_pow2(min(n, slots))
        c["read"] += d
        c["deserialize"] += d
        c["mul_plain"] += d * h
        for _ in range(d * h):
            _segment_sum(c, width)
        c["serialize"] += d * h
        _reveal(c, d * h)
    elif layout == "replicated":
        c["read"] += n * len(owners)
        c["deserialize"] += n * len(owners)
        c["mul_plain"] += n * len(owners)
        c["add"] += (n - 1) * len(owners)
        c["serialize"] += len(owners)
        _reveal(c, len(owners))
    else:
        raise ValueError(f"gradient layout must be 'cols', 'column_sum' or 'replicated', got {layout!r}")
    return c


def price(counts: Counter, costs: dict) -> float:
    return sum(costs[op] * k for op, k in counts.items())


def plan_layer(shape: PackingShape, costs: dict | None = None, forward: str = "auto") -> Plan:
    """Price every candidate for one training batch and choose the cheapest executable one."""
    costs = {**DEFAULT_COSTS, **(costs or {})}
    candidates = []
    for fwd in ("rows", "column"):
        for grad in ("cols", "column_sum", "replicated"):
            counts = forward_counts(fwd, shape, shape.batch) + gradient_counts(grad, shape, shape.batch)
            candidates.append(Candidate(fwd, grad, counts, price(counts, costs), executable=(grad == "cols")))
    allowed = [c for c in candidates if c.executable and (forward == "auto" or c.forward == forward)]
    if not allowed:
        raise ValueError(f"packing.forward must be 'auto', 'rows' or 'column', got {forward!r}")
    return Plan(min(allowed, key=lambda c: c.seconds), candidates, costs)


def choose_ckks_params(security_bits: int, budget: int, max_sigma: float, headroom_bits: int = 10) -> list[dict]:
    """Depth-1 CKKS parameter candidates, smallest ring first; the first with `ok` is the choice.

    A depth-1 chain is [q0, scale, special] with q0 = scale + headroom_bits (room for masked
    values) and a special prime >= q0; every prime is at most 60 bits. For each ring the
    largest scale the 128-bit bound admits gives the smallest error bound B, hence the smallest
    flooding σ = 2^(s/2)·sqrt(12τ)·B; the candidate is `ok` when σ <= max_sigma (the flooding
    noise, before gains, that training tolerates).
    """
    from hetrain.mpc_ops.crypto.flooding import error_bound, flood_sigma
    from hetrain.core.params import MAX_MODULUS_BITS, CkksParams

    rows = []
    for n in (4096, 8192, 16384):
        scale = min(60 - headroom_bits, (MAX_MODULUS_BITS[n] - 2 * headroom_bits) // 3)
        bits = (scale + headroom_bits, scale, scale + headroom_bits)
        params = CkksParams(n, bits, scale).validate()
        sigma = flood_sigma(security_bits, budget, error_bound(scale, n, 128))
        rows.append({"poly_modulus_degree": n, "coeff_mod_bit_sizes": list(bits), "scale_bits": scale,
                     "total_bits": sum(bits), "limit_bits": MAX_MODULUS_BITS[n], "slots": params.slots,
                     "sigma": sigma, "ok": sigma <= max_sigma})
    return rows
