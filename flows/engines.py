"""The engine protocol (what the Trainer asks of a training engine) and the one place that picks one.

Two engines implement it: HybridEngine (hetrain.hybrid_engine: the first layer on ciphertext, depth 1)
and TiledEngine (hetrain.tiled_engine: strict, mixed and encrypted-label policies). The Trainer owns
the round loop, stop rules, checkpoints and the report; an engine owns its layout, learners and maths.
"""

from typing import Protocol

import numpy as np

from hetrain.mpc_ops.layers.depth_plan import uses_tiled
from hetrain.mpc_ops.reveal.revealer import Revealer

from hetrain.runtime import Runtime

CACHE_PREFIX = "frozen_cache."


class Engine(Protocol):
    """One run's training engine, built once; its learners live across rounds."""

    name: str  # "hybrid" or "tiled"
    twin: object | None  # the plaintext twin learner (report.plaintext_twin), or None

    def prepare_owner(self, owner: str) -> dict:
        """An in-process owner: validate, standardise, encrypt and publish its bundle; a summary row."""

    def manifests(self) -> dict:
        """Every owner's manifest, as the exchange store verified it (opens the store)."""

    def bytes_read(self) -> int:
        """Bytes read from the owners' bundles so far."""

    def train_refs(self) -> list:
        """The training batches of an epoch, in store order."""

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or not) the ciphertext layers for this round: the rank limit allows no new weights."""

    def train_group(self, refs: list) -> list:
        """Train on a group of batches, in order; one result per batch."""

    def train_metrics(self, results: list) -> tuple[float | None, float | None]:
        """(mean loss, accuracy) of a round's training results (None where the trainer cannot know)."""

    def evaluate(self) -> tuple[float, float]:
        """(test loss, test accuracy) under the policy."""

    def run_twin(self, order: np.ndarray, refs: list) -> float | None:
        """The plaintext twin's round on the same batches; its test accuracy (None without a twin)."""

    def round_fields(self) -> dict:
        """Engine-specific entries of a round's metrics row."""

    def state(self) -> tuple[dict, dict, dict]:
        """(params, optimizer state, extra) for a checkpoint: 'hybrid.…' / 'twin.…' keys."""

    def restore(self, ckpt, same_data: bool) -> None:
        """Load a checkpoint written by `state`; frozen-layer caches only when `same_data`."""

    def final_fields(self, audit: dict, rounds: list[dict]) -> dict:
        """Engine-specific entries of the run's final metrics."""

    def summary(self, final: dict, rounds: list[dict], owners: list[dict], audit: dict, lineage: dict) -> str:
        """The run summary (markdown)."""


def select_engine(rt: Runtime, revealer: Revealer) -> Engine:
    """The engine the config's policy needs: verified for an untrusted trainer, tiled for strict, mixed or
    encrypted labels, else hybrid."""
    if rt.cfg.policy.trainer == "untrusted":
        from hetrain.verified_engine import VerifiedEngine

        return VerifiedEngine(rt, revealer)
    if uses_tiled(rt.cfg):
        from hetrain.tiled_engine import TiledEngine

        return TiledEngine(rt, revealer)
    from hetrain.hybrid_engine import HybridEngine

    return HybridEngine(rt, revealer)


# ---- checkpoint keys shared by the engines ----------------------------------------------------------

def prefixed(prefix: str, state: dict) -> dict:
    """Checkpoint keys of one learner: 'hybrid.enc1.W', 'twin.out.b', …"""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def cache_params(cache: dict) -> dict:
    """A frozen input layer's revealed outputs, saved so a resumed run need not reveal them again."""
    return {CACHE_PREFIX + batch_id.replace("/", "|"): z for batch_id, z in cache.items()}


def restore_cache(params: dict) -> dict:
    return {k[len(CACHE_PREFIX):].replace("|", "/"): v for k, v in params.items() if k.startswith(CACHE_PREFIX)}


def restore_learner(prefix: str, learner, ckpt) -> None:
    """Copy one learner's weights and optimizer state out of a checkpoint (a twin may start mid-run)."""
    params = unprefixed(prefix, ckpt.params)
    if learner is None or (prefix == "twin" and not params):
        return
    learner.model.load(params)
    learner.optimizer.load_state_dict(unprefixed(prefix, ckpt.optimizer_state))
