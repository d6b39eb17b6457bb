"""The first load of an untrusted context runs in a memory-limited child: a crash, OOM or hang there is a named error."""

import subprocess

import pytest

from hetrain.mpc_ops.crypto import ckks, isolation
from hetrain.core.errors import BundleError, IsolatedLoadError
from hetrain.core.params import CkksParams


@pytest.fixture
def public_bytes(ckks_keys) -> bytes:
    holder, _ = ckks_keys
    return holder.public_context()


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Every test probes for itself: no digest is remembered from another test."""
    monkeypatch.setattr(isolation, "_probed", {})


def test_probe_reports_the_parameters_of_a_real_public_context(public_bytes):
    # Execute
    facts = isolation.probe_context(public_bytes)

    # Assert
    assert facts == isolation.ContextFacts(private=False, poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 50, 60),
                                           global_scale=2.0**50, galois_keys=True, relin_keys=True)


def test_a_context_that_exhausts_the_loaders_memory_is_an_isolated_load_error(public_bytes, monkeypatch):
    # Prepare: room for the interpreter and TenSEAL (~150 MB) but not for the 19 MB context's keys
    monkeypatch.setattr(isolation, "MEMORY_BASE", 200 << 20)
    monkeypatch.setattr(isolation, "MEMORY_PER_BYTE", 0)

    # Execute / Assert: SEAL's bad_alloc surfaces as a MemoryError, as SIGABRT where nothing catches it, or
    # (seen on a fresh CI machine) as SEAL's own "I/O error" from a failed allocation inside its loader: each is a
    # clean refusal in this process, which stays alive
    with pytest.raises(BundleError, match=r"public context: ((loading \d+ bytes needed more than the isolated "
                                          r"loader's 200 MiB of memory|loading it crashed the isolated loader "
                                          r"\(SIGABRT, memory limit 200 MiB\)); refusing it|cannot be parsed "
                                          r"\(RuntimeError: I/O error\))"):
        ckks.load_public_context(public_bytes)


@pytest.mark.parametrize("returncode, message", [
    (-11, r"public context: loading it crashed the isolated loader \(SIGSEGV, memory limit \d+ MiB\); refusing it"),
    (-6, r"public context: loading it crashed the isolated loader \(SIGABRT, memory limit \d+ MiB\); refusing it"),
    (1, r"public context: the isolated loader exited with code 1 \(boom\)"),
])
def test_a_loader_that_dies_is_an_isolated_load_error_naming_how(public_bytes, monkeypatch, returncode, message):
    # Prepare
    monkeypatch.setattr(isolation.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], returncode, b"", b"Traceback...\nboom\n"))

    # Execute / Assert
    with pytest.raises(IsolatedLoadError, match=message):
        isolation.probe_context(public_bytes)


def test_a_loader_that_hangs_is_an_isolated_load_error(public_bytes, monkeypatch):
    # Prepare
    monkeypatch.setattr(isolation, "TIMEOUT_SECONDS", 0.01)

    # Execute / Assert
    with pytest.raises(IsolatedLoadError, match=r"took longer than 0\.01 s in the isolated loader"):
        isolation.probe_context(public_bytes)


def test_junk_is_refused_by_the_child_without_loading_it_here(monkeypatch):
    # Prepare: the in-process loader must never be reached
    monkeypatch.setattr(ckks.ts, "context_from", lambda data: pytest.fail("loaded in-process"))

    # Execute / Assert
    with pytest.raises(BundleError, match=r"public context: cannot be parsed \((ValueError|RuntimeError): "):
        ckks.load_public_context(b"\x0a\x05 not a context")


def test_context_with_other_parameters_than_the_config_is_refused(public_bytes):
    # Prepare
    params = CkksParams(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 50, 50, 60), scale_bits=50)

    # Execute / Assert
    with pytest.raises(BundleError, match=(
        r"public context: poly_modulus_degree 8192, coeff_mod_bit_sizes \[60, 50, 60\], scale 1125899906842624\.0, "
        r"Galois keys True; the config needs 16384, \[60, 50, 50, 60\], 2\^50 and Galois keys"
    )):
        ckks.load_public_context(public_bytes, params=params)


def test_each_context_digest_is_probed_once_per_process(public_bytes, monkeypatch):
    # Prepare
    first = isolation.probe_context(public_bytes)
    monkeypatch.setattr(isolation.subprocess, "run", lambda *a, **k: pytest.fail("probed twice"))

    # Execute
    again = isolation.probe_context(public_bytes)

    # Assert
    assert again is first


def test_size_over_the_bound_is_refused_before_any_load(monkeypatch):
    # Prepare
    monkeypatch.setattr(ckks, "MAX_CONTEXT_BYTES", 10)

    # Execute / Assert
    with pytest.raises(BundleError, match=r"public context: must be 1\.\.10 bytes, got 11"):
        ckks.load_public_context(b"x" * 11)
