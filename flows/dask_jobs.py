"""Ciphertext jobs as Prefect tasks on a Dask cluster (train.compute: dask).

The round flow runs with prefect-dask's DaskTaskRunner; each forward or gradient splits its
jobs into groups and submits one `cipher-jobs` task per group. A task carries bytes and numpy
arrays only: the serialized ciphertexts, the jobs, and the path and SHA-256 of the public
context, which each Dask worker reads once from the exchange store and keeps.
"""

from contextlib import contextmanager
from pathlib import Path

import tenseal as ts
from prefect import task
from prefect.cache_policies import NO_CACHE

from hetrain.mpc_ops.crypto import ckks
from hetrain.core import store
from hetrain.core.errors import DigestMismatch
from hetrain.mpc_ops.crypto.jobs import Job, run_jobs

_contexts: dict[str, ts.Context] = {}


def _context(path: str, sha256: str) -> ts.Context:
    """The public context, read and verified once per worker process."""
    if sha256 not in _contexts:
        data = Path(path).read_bytes()
        if store.sha256_bytes(data) != sha256:
            raise DigestMismatch(f"{path}: the public context's SHA-256 is not the one the trainer sent ({sha256[:16]}…)")
        _contexts[sha256] = ckks.load_public_context(data)
    return _contexts[sha256]


@task(name="cipher-jobs", cache_policy=NO_CACHE)
def cipher_jobs(context_path: str, context_sha256: str, slots: int, blobs: list[bytes], jobs: list[Job]) -> list[bytes]:
    """Σ (ciphertext × plaintext), then optional segment sums, for one group of jobs."""
    return run_jobs(_context(context_path, context_sha256), slots, blobs, jobs)


class DaskJobRunner:
    """JobRunner's interface, with each group of jobs submitted as a `cipher-jobs` task (bytes in, bytes out)."""

    def __init__(self, context_path: Path, slots: int, groups: int):
        self.context_path, self.slots, self.groups = str(context_path), slots, max(1, groups)
        self.context_sha256 = store.sha256_file(context_path)

    def run(self, blobs: list[bytes], jobs: list[Job]) -> list[bytes]:
        size = -(-len(jobs) // self.groups)
        futures = [cipher_jobs.submit(self.context_path, self.context_sha256, self.slots, blobs, jobs[i : i + size])
                   for i in range(0, len(jobs), size)]
        return [blob for f in futures for blob in f.result()]


@contextmanager
def dask_cluster(address: str | None, workers: int):
    """The scheduler address to use: the configured one, or a LocalCluster for the run's duration."""
    if address is not None:
        yield address
        return
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=50)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def task_runner(address: str):
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
