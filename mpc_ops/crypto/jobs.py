"""Ciphertext work as plain data: a job is Σ (blob × multiplier), then an optional rotate-and-sum.

Jobs carry bytes and numpy arrays only, so they run the same in this process or in a worker
process (TenSEAL holds the GIL, so threads would not help). Workers load the public context
once and keep it.
"""

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import SpawnContext, SpawnProcess

import numpy as np
import tenseal as ts

from hetrain.mpc_ops.crypto import ckks

# (terms, width): terms are (blob index, plain slot vector or scalar); width > 1 sums segments
Job = tuple[list[tuple[int, "np.ndarray | float"]], int]


def run_jobs(context: ts.Context, slots: int, blobs: list[bytes], jobs: list[Job]) -> list[bytes]:
    """Execute jobs against the blobs; return one serialized ciphertext per job."""
    layout = ckks.fresh_layout(context)  # jobs read owners' blobs, which are fresh encryptions
    loaded = [ckks.load_vector(context, b, layout) for b in blobs]
    out = []
    for terms, width in jobs:
        acc = None
        for index, multiplier in terms:
            if np.ndim(multiplier) == 0:
                term = ckks.multiply_scalar(loaded[index], float(multiplier))
            else:
                term = ckks.multiply_plain(loaded[index], multiplier)
            acc = term if acc is None else acc.add_(term)
        if width > 1:
            acc = ckks.segment_sum(context, acc, width, slots)
        out.append(acc.serialize())
    return out


_worker_context: ts.Context | None = None


def _init_worker(public_context: bytes) -> None:
    global _worker_context
    _worker_context = ckks.load_public_context(public_context, isolate=False)  # the trainer's own bytes


def _ready(pause: float) -> bool:
    import time

    time.sleep(pause)  # long enough that every worker, not just the first, takes one
    return _worker_context is not None


def _run_in_worker(slots: int, blobs: list[bytes], jobs: list[Job]) -> list[bytes]:
    return run_jobs(_worker_context, slots, blobs, jobs)


class _WorkerProcess(SpawnProcess):
    """A spawned worker that does not re-run the caller's `__main__`.

    Workers run only this module's functions, so they never need the caller's script; without this, a
    script that calls `hetrain.train` with no `if __name__ == "__main__":` guard would start training
    again in every worker process (multiprocessing's spawn imports `__main__` in the child).
    """

    @staticmethod
    def _Popen(process_obj):
        main = sys.modules["__main__"]
        saved = {k: main.__dict__.pop(k) for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__spec__ = None  # spawn reads `__spec__.name`, then `__file__`, to re-import the main module
        try:
            return SpawnProcess._Popen(process_obj)
        finally:
            del main.__spec__
            main.__dict__.update(saved)


class _WorkerContext(SpawnContext):
    Process = _WorkerProcess


class JobRunner:
    """Runs job lists serially, or split across `workers` processes (bytes in, bytes out)."""

    _pools: dict[tuple[str, int], ProcessPoolExecutor] = {}

    def __init__(self, context: ts.Context, slots: int, workers: int = 1):
        self.context, self.slots = context, slots
        self.workers = max(1, min(int(workers), os.cpu_count() or 1))
        self._key = (ckks.key_id(context), self.workers) if self.workers > 1 else None

    def _pool(self) -> ProcessPoolExecutor:
        pool = self._pools.get(self._key)
        if pool is None:
            public = self.context.serialize(save_secret_key=False)
            pool = ProcessPoolExecutor(self.workers, mp_context=_WorkerContext(),
                                       initializer=_init_worker, initargs=(public,))
            self._pools[self._key] = pool
        return pool

    def warm_up(self) -> None:
        """Start every worker process now (spawn + loading the public context take seconds)."""
        if self.workers > 1:
            pool = self._pool()
            for future in [pool.submit(_ready, 0.2) for _ in range(self.workers)]:
                future.result()

    def run(self, blobs: list[bytes], jobs: list[Job]) -> list[bytes]:
        if self.workers == 1 or len(jobs) < 2:
            return run_jobs(self.context, self.slots, blobs, jobs)
        size = -(-len(jobs) // self.workers)
        parts = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        futures = [self._pool().submit(_run_in_worker, self.slots, blobs, part) for part in parts]
        return [blob for f in futures for blob in f.result()]

    @classmethod
    def shutdown(cls) -> None:
        for pool in cls._pools.values():
            pool.shutdown(cancel_futures=True)
        cls._pools.clear()
