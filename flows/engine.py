"""The training step, shared by the hybrid run and its plaintext twin (no Prefect in here).

One step reads, in order: ciphertext forward, explicit reveal, plaintext forward, loss,
plaintext backward, ciphertext gradient, explicit reveal, optimizer step. The twin runs the
very same code with `PlainInputLinear` as the front and the identity as the reveal.
"""

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hetrain.core.config import RunConfig
from hetrain.mpc_ops.reveal.dp import clip_rows, drop_sparse_columns
from hetrain.mpc_ops.layers.optim import build_optimizer
from hetrain.mpc_ops.layers.model import Model  # lives below the engine: depth_plan runs it too


def make_optimizer(cfg: RunConfig):
    opt = cfg.train.optimizer
    kwargs = {"lr": opt.lr} if opt.kind == "adam" else {"lr": opt.lr, "momentum": opt.momentum}
    return build_optimizer(opt.kind, **kwargs)


@dataclass
class StepResult:
    loss: float
    correct: int
    n: int


@dataclass
class LazyBatch:
    """A batch read from the exchange store only if its input layer output is not cached."""

    batch_id: str
    load: Callable[[], Any]


class Learner:
    """One side of training: a front (ciphertext layer or its twin), a reveal, a model, an optimizer.

    Once the input layer is frozen (the reveal policy's rank limit allows no new weights),
    its weights stop training, its gradient is no longer revealed, and with `cache_frozen`
    each batch's revealed X·W is kept: later rounds run in plaintext.
    """

    def __init__(self, model: Model, optimizer, front, reveal: Callable, *, dp_clip: float | None = None,
                 cache_frozen: bool = False, min_rows: int = 1):
        self.model, self.optimizer, self.front, self.reveal = model, optimizer, front, reveal
        self.dp_clip, self.cache_frozen = dp_clip, cache_frozen
        self.min_rows = min_rows  # policy.min_batch: a δ column over fewer samples is zeroed, never revealed
        self.input_frozen = False
        self.frozen_cache: dict[str, np.ndarray] = {}

    def freeze_input(self) -> None:
        self.input_frozen = True

    def _pre_activation(self, x) -> np.ndarray:
        if self.input_frozen and x.batch_id in self.frozen_cache:
            return self.frozen_cache[x.batch_id]
        z = self.reveal(self.front.forward(x.load() if isinstance(x, LazyBatch) else x))
        if self.input_frozen and self.cache_frozen:
            self.frozen_cache[x.batch_id] = z
        return z

    def _forward(self, x, y: np.ndarray) -> tuple[np.ndarray, float]:
        z = self._pre_activation(x) + self.model.input.b
        logits = self.model.body.forward(z)
        return logits, self.model.loss.forward(logits, y)

    def train_batch(self, x, y: np.ndarray) -> StepResult:
        logits, loss = self._forward(x, y)
        grad_z = self.model.body.backward(self.model.loss.backward())
        self.model.input.grad_b = grad_z.sum(axis=0)
        frozen_key = f"{self.model.input.name}.W"
        if not self.input_frozen:
            delta = clip_rows(grad_z, self.dp_clip) if self.dp_clip else grad_z
            delta = drop_sparse_columns(delta, self.min_rows)
            self.model.input.grad_W = self.reveal(self.front.backward(delta))
        params, grads = self.model.parameters(), self.model.grads()
        if self.input_frozen:
            params.pop(frozen_key)
            grads.pop(frozen_key)
        self.optimizer.step(params, grads)
        return StepResult(loss * len(y), int((self.model.loss.predict(logits) == y).sum()), len(y))

    def eval_batch(self, x, y: np.ndarray) -> StepResult:
        logits, loss = self._forward(x, y)
        return StepResult(loss * len(y), int((self.model.loss.predict(logits) == y).sum()), len(y))


def input_frozen_in(train_rounds: int | None, trained_before: int) -> bool:
    """Whether the input layer is frozen in a round, given policy.input_train_rounds and the rounds in which
    it already trained (in this run and, for a warm start, in its ancestors)."""
    return train_rounds is not None and trained_before >= train_rounds


def batch_order(seed: int, round_no: int, count: int) -> np.ndarray:
    """The shuffled batch order of a round: the same for the hybrid, the twin and a resumed run."""
    return np.random.default_rng([seed, round_no]).permutation(count)


def summarise(results: list[StepResult]) -> tuple[float, float]:
    """(mean loss, accuracy) over a list of step results."""
    n = sum(r.n for r in results)
    return sum(r.loss for r in results) / n, sum(r.correct for r in results) / n
