"""First load of an untrusted TenSEAL context in a child process with a memory limit.

A public context is tens of megabytes of nested SEAL objects (keys, Galois keys) that hetrain
cannot check structurally the way it checks a ciphertext. So the first time a process sees a
given context, a child process (`python -m hetrain.mpc_ops.crypto.isolation`) loads it under RLIMIT_AS and
reports what it found. A crash, an out-of-memory or a hang there becomes an IsolatedLoadError
instead of taking the role down; a context that loaded cleanly is then loaded in-process (the
same bytes through the same code). Each context digest is probed once per process.
"""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hetrain.core.errors import BundleError, IsolatedLoadError

MEMORY_BASE = 1 << 30  # interpreter, numpy and TenSEAL need ~300 MB of address space
MEMORY_PER_BYTE = 8  # a loaded context takes ~3x its serialized size; 8x leaves room
TIMEOUT_SECONDS = 120.0
_EXIT_MEMORY, _EXIT_REFUSED = 3, 2
_probed: dict[str, "ContextFacts"] = {}


@dataclass(frozen=True)
class ContextFacts:
    """What a context holds, as far as a role needs to know before trusting it."""

    private: bool
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale: float | None
    galois_keys: bool
    relin_keys: bool


def context_facts(context) -> ContextFacts:
    """Read the facts from a loaded TenSEAL context (in the child, or in-process when not isolated)."""
    seal = context.seal_context().data
    totals, level = [], seal.key_context_data()
    while level is not None:  # total modulus bits per level, from all primes down to the last one
        totals.append(level.total_coeff_modulus_bit_count())
        level = level.next_context_data()
    bits = [b - a for a, b in zip(totals[1:] + [0], totals)][::-1]
    try:
        scale = float(context.global_scale)
    except ValueError:  # TenSEAL raises when no global scale was set
        scale = None
    return ContextFacts(context.is_private(), seal.key_context_data().parms().poly_modulus_degree(),
                        tuple(bits), scale, context.has_galois_keys(), context.has_relin_keys())


def memory_limit(size: int) -> int:
    """Address-space limit of the child that loads `size` bytes."""
    return MEMORY_BASE + MEMORY_PER_BYTE * size


def probe_context(data: bytes, what: str = "public context") -> ContextFacts:
    """Load `data` in a memory-limited child process; return its facts or raise a BundleError subclass."""
    digest = hashlib.sha256(data).hexdigest()
    if digest in _probed:
        return _probed[digest]
    limit = memory_limit(len(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "hetrain.mpc_ops.crypto.isolation", str(limit)], input=data,
                              capture_output=True, timeout=TIMEOUT_SECONDS, env=env)
    except subprocess.TimeoutExpired:
        raise IsolatedLoadError(f"{what}: loading it took longer than {TIMEOUT_SECONDS:g} s in the isolated "
                                f"loader; refusing it") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise IsolatedLoadError(f"{what}: loading it crashed the isolated loader ({name}, memory limit "
                                f"{limit >> 20} MiB); refusing it")
    if done.returncode == _EXIT_MEMORY:
        raise IsolatedLoadError(f"{what}: loading {len(data)} bytes needed more than the isolated loader's "
                                f"{limit >> 20} MiB of memory; refusing it")
    if done.returncode == _EXIT_REFUSED:
        raise BundleError(f"{what}: cannot be parsed ({done.stdout.decode(errors='replace').strip()[:300]})")
    try:
        raw = json.loads(done.stdout)
        facts = ContextFacts(**{**raw, "coeff_mod_bit_sizes": tuple(raw["coeff_mod_bit_sizes"])})
    except (ValueError, TypeError, KeyError):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise IsolatedLoadError(f"{what}: the isolated loader exited with code {done.returncode} ({tail[0][:200]})") \
            from None
    _probed[digest] = facts
    return facts


def _child(limit: int) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)  # never above an inherited cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    data = sys.stdin.buffer.read()
    try:
        import tenseal as ts

        facts = context_facts(ts.context_from(data))
    except MemoryError:
        return _EXIT_MEMORY
    except Exception as exc:  # TenSEAL and SEAL raise bare ValueError/RuntimeError/TypeError on junk
        print(f"{type(exc).__name__}: {exc}", flush=True)
        return _EXIT_REFUSED
    print(json.dumps(facts.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
