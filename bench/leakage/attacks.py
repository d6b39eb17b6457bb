"""The deviating trainer's attacks, each run against a live key holder and scored against the truth.

Every attack returns an Outcome: `blocked` when the key holder refused (or gave nothing usable), `leaked`
with a measure otherwise. The truth (the owners' standardised features) is read by the harness only.
"""

import uuid
from dataclasses import dataclass, field

import numpy as np

from hetrain.bench.leakage import key_attack
from hetrain.core.errors import HetrainError
from hetrain.mpc_ops.crypto import ckks
from hetrain.mpc_ops.reveal.protocol import RevealRequest


@dataclass
class Outcome:
    attack: str
    verdict: str  # "blocked" or "leaked"
    measure: dict = field(default_factory=dict)
    refusal: str | None = None


def _refused(name: str, exc: Exception) -> Outcome:
    return Outcome(name, "blocked", {}, f"{type(exc).__name__}: {exc}"[:300])


def r2(estimate: np.ndarray, truth: np.ndarray) -> float:
    """1 − SSE/SST over every value (feature columns pooled)."""
    truth, estimate = np.asarray(truth, dtype=float).ravel(), np.asarray(estimate, dtype=float).ravel()
    sst = float(((truth - truth.mean()) ** 2).sum())
    return 1.0 - float(((estimate - truth) ** 2).sum()) / sst if sst > 0 else 0.0


def exact_values(estimate: np.ndarray, truth: np.ndarray, tol: float = 0.05) -> int:
    """Raw values recovered to within `tol` (standardised units; the flooding is ~0.03)."""
    return int((np.abs(np.asarray(estimate) - np.asarray(truth)) < tol).sum())


def secret_key(t) -> Outcome:
    """(0, Δ) and (0, Δ·X^(N/2)) as gradient reveals; the key checked on the public key."""
    p = t.params
    result = key_attack.run(t.client, t.product_template(), t.key_id, p.poly_modulus_degree,
                            list(p.coeff_mod_bit_sizes), 2.0 ** p.scale_bits, t.layer, 64, t.rows(64), t.public)
    if result.refused:
        return Outcome("secret_key_two_crafted_reveals", "blocked", {"key_coefficients_recovered": 0}, result.refused)
    return Outcome("secret_key_two_crafted_reveals", "leaked" if result.exact else "blocked",
                   {"key_coefficients_recovered": result.recovered, "public_key_residual": result.residual})


def raw_ciphertext(t) -> Outcome:
    """An owner's fresh ciphertext from the exchange store, times 1 (to the product level), as a gradient."""
    blob, truth = t.owner_ciphertext()
    vector = ckks.load_vector(t.context, blob, ckks.fresh_layout(t.context)).mul(1.0)
    request = RevealRequest(uuid.uuid4().hex, t.key_id, "gradient", t.layer, 1, [vector.serialize()], [1],
                            [len(truth)], 64, rows=t.rows(64))
    try:
        values = t.client.reveal(request).values[0]
    except HetrainError as exc:
        return _refused("raw_owner_ciphertext_as_gradient", exc)
    exact = exact_values(values, truth)
    return Outcome("raw_owner_ciphertext_as_gradient", "leaked" if exact or r2(values, truth) > 0.5 else "blocked",
                   {"feature_r2": round(r2(values, truth), 4), "raw_values_recovered": exact})


def unit_vector_weights(t) -> Outcome:
    """The ciphertext layer's weights chosen as unit vectors: each output is one raw feature."""
    h = t.outputs
    chosen = np.full((t.d, h), 1e-6)
    chosen[np.arange(h), np.arange(h)] = 1.0
    try:
        values, truth = t.reveal_with_weights(chosen)
    except HetrainError as exc:
        return _refused("unit_vector_weights", exc)
    k = values.shape[1]
    est, real = values, truth[:, :k]
    return Outcome("unit_vector_weights", "leaked" if r2(est, real) > 0.9 else "blocked",
                   {"features_exposed": k, "feature_r2": round(r2(est, real), 4),
                    "raw_values_recovered": exact_values(est, real)})


def reused_digest(t) -> Outcome:
    """Unit-vector weights revealed while declaring the digest of weights the ledger already counted: the rank
    ledger would see one W and let every feature through."""
    try:
        values, truth = t.reveal_under_old_digest()
    except HetrainError as exc:
        return _refused("reused_weights_digest", exc)
    k = values.shape[1]
    return Outcome("reused_weights_digest", "leaked" if r2(values, truth[:, :k]) > 0.9 else "blocked",
                   {"features_exposed": k, "feature_r2": round(r2(values, truth[:, :k]), 4),
                    "raw_values_recovered": exact_values(values, truth[:, :k])})


def headroom_probe(t) -> Outcome:
    """Binary search on the key holder's range check with a known offset: a check before flooding gives a
    value to 1e-11; after flooding, to the flooding noise only."""
    try:
        estimates, probes = t.probe_headroom()
    except HetrainError as exc:
        return _refused("headroom_binary_search", exc)
    # unflooded, the searches agree to ~1e-11; flooded, they scatter by the noise (one may land close by luck)
    spread = max(estimates) - min(estimates)
    error = float(np.median([abs(e - t.HEADROOM_PROBE_VALUE) for e in estimates]))
    return Outcome("headroom_binary_search", "leaked" if spread < 1e-6 else "blocked",
                   {"abs_error": float(f"{error:.3g}"), "spread": float(f"{spread:.3g}"), "decryptions": probes})


def one_hot_delta(t) -> Outcome:
    """A gradient reveal with δ = e_i: X^T·δ is sample i's feature vector, whatever min_batch says."""
    try:
        values, truth = t.one_hot_gradient()
    except HetrainError as exc:
        return _refused("one_hot_delta_gradient", exc)
    return Outcome("one_hot_delta_gradient", "leaked" if r2(values, truth) > 0.9 else "blocked",
                   {"feature_r2": round(r2(values, truth), 4), "raw_values_recovered": exact_values(values, truth)})


def repeated_reveal(t) -> Outcome:
    """The same output revealed again: averaging k reveals divides the flooding noise by √k."""
    try:
        first, second = t.reveal_twice()
    except HetrainError as exc:
        return _refused("repeated_reveal_averaging", exc)
    return Outcome("repeated_reveal_averaging", "leaked",
                   {"noise_std_single": round(float(np.std(first - second) / np.sqrt(2)), 5)})


def pseudonyms(t) -> Outcome:
    """Invert the published sample pseudonyms by hashing guessed IDs with the config's public seed."""
    published, guesses = t.pseudonym_guesses()
    inverted = len(set(published) & set(guesses))
    return Outcome("invert_pseudonyms", "leaked" if inverted else "blocked",
                   {"inverted": inverted, "published": len(published)})


def twin_plaintext(t) -> Outcome:
    """Whether the trainer's own run directory holds the owners' standardised plaintext (the twin's input)."""
    files = t.owner_plaintext_files()
    return Outcome("read_twin_plaintext", "leaked" if files else "blocked", {"files": len(files)})


def verified_forgery(t) -> Outcome:
    """Under verified reveals: a crafted (0, Δ) at the verified level, declared as a chunk's output."""
    if not t.untrusted:
        return Outcome("forged_verified_reveal", "blocked", {}, "not applicable: the key holder has no verified mode")
    try:
        t.forged_verified()
    except HetrainError as exc:
        return _refused("forged_verified_reveal", exc)
    return Outcome("forged_verified_reveal", "leaked", {})


# repeated_reveal before unit_vector_weights: the latter spends the batch's rank limit
CATALOGUE = [secret_key, raw_ciphertext, repeated_reveal, unit_vector_weights, one_hot_delta, reused_digest,
             headroom_probe, pseudonyms, twin_plaintext, verified_forgery]

