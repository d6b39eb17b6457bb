"""The key holder as its own process: `hetrain key-holder serve` in a subprocess, reached through
HttpKeyHolderClient. Reveals match the in-process key holder; every refused request gets its status
code and the service keeps serving; an unreachable service fails fast with KeyHolderUnreachable."""

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from hetrain.mpc_ops.crypto import ckks
from hetrain.mpc_ops.reveal import frame as reveal_wire
from hetrain.configure import load_config
from hetrain.core.errors import (BudgetExhausted, BundleError, ForeignKeyError, FrameError, KeyHolderRejected,
                            KeyHolderUnreachable, PolicyRefusal)
from hetrain.mpc_ops.reveal.http_client import HttpKeyHolderClient
from hetrain.core.shapes import cipher_layer_shapes
from hetrain.mpc_ops.reveal.protocol import blind, unblind
from hetrain.mpc_ops.crypto.tensors import EncryptedTensor
from hetrain.mpc_ops.reveal.token_file import read_token
from tests.conftest import write_config

pytestmark = pytest.mark.e2e  # the key-holder service as a subprocess

REPO = Path(__file__).resolve().parent.parent
SLOTS = 4096
VALUES = np.array([0.5, -1.25, 3.0, 7.75])  # what every test ciphertext holds in slots 0..3


# ---- running the service -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    url: str
    token_file: Path
    key_dir: Path
    log: Path
    config: Path
    verify: object = True

    def client(self, **options) -> HttpKeyHolderClient:
        options = {"timeout_s": 30.0, "retries": 0, **options}
        return HttpKeyHolderClient(self.url, read_token(self.token_file), **options)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/v1/health", timeout=10, verify=self.verify).json()


@contextmanager
def running_service(config: Path, folder: Path, *extra: str, scheme: str = "http", verify=True, port: int = 0):
    """`hetrain key-holder serve` in a subprocess on a (free) loopback port; stopped on exit."""
    port, log = port or free_port(), folder / "service.log"
    service = Service(f"{scheme}://127.0.0.1:{port}", folder / "kh.token", folder / "key_holder", log, config, verify)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hetrain.cli", "key-holder", "serve", str(config), "--key-dir", str(service.key_dir),
             "--port", str(port), "--token-file", str(service.token_file), *extra],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the key-holder service exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{service.url}/v1/health", timeout=2, verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the key-holder service did not answer /v1/health:\n{log.read_text()}")
            time.sleep(0.1)
        yield service
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def service_config(folder: Path, demo: Path, **policy) -> Path:
    """The tiny breast-cancer test config (as the flow tests use), with policy overrides."""
    path = write_config(folder, demo, rounds=2)
    raw = yaml.safe_load(path.read_text())
    raw["policy"]["flooding"].update(policy)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory, demo_data):
    folder = tmp_path_factory.mktemp("kh-service")
    with running_service(service_config(folder, demo_data), folder) as running:
        yield running


@pytest.fixture(scope="module")
def public(service):
    """The service's public context, as the trainer loads it."""
    client = service.client()
    return ckks.load_public_context(client.public_context(), expected_key_id=service.health()["key_id"])


def in_process_copy(service: Service, folder: Path):
    """The in-process key holder on a copy of the service's key directory (same key, its own budget and log)."""
    from hetrain.participants.key_holder import KeyHolder

    cfg, _ = load_config(service.config)
    copy = folder / "key_holder_copy"
    shutil.copytree(service.key_dir, copy)
    return KeyHolder.open_or_create(copy, cfg.ckks.params(), cfg.policy, cipher_layer_shapes(cfg))


def product_blob(public, values: np.ndarray) -> bytes:
    """A ciphertext after one ct × plain product: the level every revealed blob has."""
    fresh = ckks.load_vector(public, ckks.encrypt(public, values), ckks.fresh_layout(public))
    return ckks.multiply_plain(fresh, np.ones(SLOTS)).serialize()


def encrypted(public, *, kind="gradient", layer="enc1", aggregate=64, n_blobs=1, blob=None) -> EncryptedTensor:
    """An encrypted layer output holding VALUES in slots 0..3 of each blob."""
    slots = np.zeros(SLOTS)
    slots[: len(VALUES)] = VALUES
    return EncryptedTensor(
        kind=kind, layer=layer, shape=(len(VALUES), n_blobs),
        blobs=[blob or product_blob(public, slots) for _ in range(n_blobs)], stride=[1] * n_blobs,
        counts=[len(VALUES)] * n_blobs, placement=[(np.arange(len(VALUES)), b) for b in range(n_blobs)],
        aggregate=aggregate, meta={"rows": [f"{i:024x}" for i in range(aggregate)]},
    )


def masked(public, **options):
    """A blinded reveal request, as the trainer sends it, and what is needed to unblind the answer."""
    enc = encrypted(public, **options)
    request, masks = blind(enc, public, key_id=ckks.key_id(public), round_no=1, mask_bound=64.0)
    return enc, request, masks


def assert_good_reveal(service: Service, public) -> None:
    """The service answers health and still reveals correctly (after a refused request)."""
    assert service.health()["status"] == "ok"
    enc, request, masks = masked(public)
    response = service.client().reveal(request)
    np.testing.assert_allclose(unblind(enc, response, masks)[:, 0], VALUES, rtol=0, atol=8 * response.sigma + 1e-6)


def post_reveal(service: Service, content, token: str | None = "good") -> httpx.Response:
    headers = {} if token is None else {
        "Authorization": f"Bearer {read_token(service.token_file) if token == 'good' else token}"}
    return httpx.post(f"{service.url}/v1/reveal", content=content, headers=headers, timeout=30)


# ---- answers -----------------------------------------------------------------------------------


def test_health_answers_without_a_token_with_the_key_id_and_the_body_limit(service, public):
    # Execute
    health = service.health()

    # Assert: the default limit is the config's largest reveal: 5 outputs × 1 chunk, ciphertexts of
    # at most 2·8192·2·8 bytes, plus headers naming up to 2·64 - 1 samples
    assert health == {"status": "ok", "key_id": ckks.key_id(public),
                      "max_body_bytes": 4 + 4096 + 5 * 64 + 32 * 127 + 5 * 266240}


def test_public_context_needs_the_token_and_carries_no_secret_key(service):
    # Execute
    refused = httpx.get(f"{service.url}/v1/public-context", timeout=30)
    data = service.client().public_context()

    # Assert
    assert refused.status_code == 401 and refused.json()["error"] == "Unauthorized"
    assert not ckks.load_public_context(data).is_private()


def test_reveal_through_the_service_matches_the_in_process_key_holder(service, public, tmp_path):
    # Prepare: the same blinded request, once over HTTP and once to the same key in-process
    holder = in_process_copy(service, tmp_path)
    enc, request, masks = masked(public, n_blobs=3)
    client = service.client()
    used_before = client.decryptions_used

    # Execute
    remote = client.reveal(request)
    local = holder.reveal(request)

    # Assert: both within 8σ of the truth, so within 8·√2·σ of each other; same σ, same charge
    via_http, in_process = unblind(enc, remote, masks), unblind(enc, local, masks)
    assert remote.sigma == local.sigma and remote.request_id == request.request_id
    np.testing.assert_allclose(via_http, np.tile(VALUES[:, None], 3), rtol=0, atol=8 * remote.sigma + 1e-6)
    np.testing.assert_allclose(via_http, in_process, rtol=0, atol=8 * np.sqrt(2) * remote.sigma + 1e-6)
    assert client.decryptions_used == remote.decryptions_used == used_before + 3
    assert client.audit_summary()["decryptions_used"] == used_before + 3


def test_a_retried_request_gets_the_same_answer_without_a_second_decryption(service, public):
    # Prepare
    _, request, _ = masked(public)
    client = service.client()
    first = client.reveal(request)

    # Execute
    again = client.reveal(request)

    # Assert
    assert [v.tobytes() for v in again.values] == [v.tobytes() for v in first.values]
    assert client.audit_summary()["decryptions_used"] == first.decryptions_used


def test_a_request_id_reused_for_another_request_is_refused(service, public):
    # Prepare
    _, request, _ = masked(public)
    client = service.client()
    client.reveal(request)
    _, other, _ = masked(public)

    # Execute / Assert
    with pytest.raises(FrameError, match=rf"request_id '{request.request_id}' was already used for a different"):
        client.reveal(replace(other, request_id=request.request_id))


# ---- refused requests: status code, and the service keeps serving -------------------------------


def _oversized(service):
    return post_reveal(service, b"\0" * (service.health()["max_body_bytes"] + 1))


def _oversized_streamed(service):
    def chunks():  # no Content-Length: the service counts while it reads
        for _ in range(64):
            yield b"\0" * (1 << 16)
    return post_reveal(service, chunks())


def _garbage_ciphertext(service, public):
    _, request, _ = masked(public)
    return post_reveal(service, reveal_wire.encode_request(replace(request, blobs=[b"\x0a\x02" * 300])))


REFUSALS = {
    "no-token": (lambda s, p: post_reveal(s, b"x", token=None), 401, "Unauthorized"),
    "wrong-token": (lambda s, p: post_reveal(s, b"x", token="W" * 43), 401, "Unauthorized"),
    "content-length-over-limit": (lambda s, p: _oversized(s), 413, "PayloadTooLarge"),
    "streamed-body-over-limit": (lambda s, p: _oversized_streamed(s), 413, "PayloadTooLarge"),
    "malformed-frame": (lambda s, p: post_reveal(s, b"\0\0\0\x02{}"), 400, "FrameError"),
    "garbage-ciphertext": (_garbage_ciphertext, 400, "BundleError"),
    "policy-refusal": (lambda s, p: post_reveal(s, reveal_wire.encode_request(masked(p, aggregate=31)[1])),
                       403, "PolicyRefusal"),
    "foreign-key-id": (lambda s, p: post_reveal(s, reveal_wire.encode_request(
        replace(masked(p)[1], key_id="k-" + "0" * 32))), 409, "ForeignKeyError"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_request_gets_its_status_and_the_service_keeps_serving(service, public, case):
    # Prepare
    send, status, error = REFUSALS[case]

    # Execute
    answer = send(service, public)

    # Assert
    assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
    if case == "policy-refusal":
        assert answer.json()["rule"] == "min_batch"
    assert_good_reveal(service, public)


def test_policy_refusal_answer_names_the_rule_and_the_message(service, public):
    # Execute
    answer = post_reveal(service, reveal_wire.encode_request(masked(public, aggregate=31)[1]))

    # Assert
    assert answer.json() == {"error": "PolicyRefusal", "rule": "min_batch",
                             "message": "layer 'enc1': the gradient aggregates 31 samples, fewer than policy.min_batch=32"}


@pytest.mark.parametrize("change", ["min_batch", "undeclared_layer", "foreign_key_id", "garbage_ciphertext"])
def test_client_raises_the_same_named_exception_as_the_in_process_key_holder(service, public, tmp_path, change):
    # Prepare
    holder = in_process_copy(service, tmp_path)
    _, request, _ = masked(public, aggregate=31 if change == "min_batch" else 64,
                           layer="enc2" if change == "undeclared_layer" else "enc1")
    if change == "foreign_key_id":
        request = replace(request, key_id="k-" + "0" * 32)
    if change == "garbage_ciphertext":
        request = replace(request, blobs=[b"\x0a\x02" * 300])

    # Execute
    with pytest.raises(BundleError if "key" in change or "garbage" in change else PolicyRefusal) as remote:
        service.client().reveal(request)
    with pytest.raises(Exception) as local:
        holder.reveal(request)

    # Assert
    assert type(remote.value) is type(local.value)
    assert str(remote.value) == str(local.value)
    assert getattr(remote.value, "rule", None) == getattr(local.value, "rule", None)
    assert_good_reveal(service, public)


def test_ciphertext_made_under_another_key_is_refused_as_a_foreign_key(service, public, ckks_keys):
    # Prepare: a ciphertext of another key, sent under the service's key id
    _, other_public = ckks_keys
    enc = encrypted(other_public)
    request, _ = blind(enc, other_public, key_id=ckks.key_id(public), round_no=1, mask_bound=64.0)

    # Execute
    with pytest.raises(ForeignKeyError, match=r"beyond the headroom of 512: the ciphertext was made under another key"):
        service.client().reveal(request)

    # Assert
    assert_good_reveal(service, public)


def test_wrong_token_and_oversize_map_to_key_holder_rejected(service, public):
    # Prepare
    wrong = HttpKeyHolderClient(service.url, "W" * 43, retries=0)
    _, request, _ = masked(public, n_blobs=20)  # 20 product ciphertexts of ~131 kB: over the ~1.3 MB limit

    # Execute
    with pytest.raises(KeyHolderRejected, match=r"refused the bearer token \(HTTP 401\)") as unauthorized:
        wrong.audit_summary()
    with pytest.raises(KeyHolderRejected, match=r"as too large \(HTTP 413: .*\); restart it with a larger --max-body-mb"):
        service.client().reveal(request)

    # Assert
    assert unauthorized.value.status == 401


def test_refused_requests_are_logged_in_one_line_without_a_traceback(service, public):
    # Prepare
    post_reveal(service, b"x", token=None)
    post_reveal(service, reveal_wire.encode_request(masked(public, aggregate=31)[1]))

    # Execute
    log = service.log.read_text()

    # Assert
    assert "Traceback" not in log
    assert "POST /v1/reveal from 127.0.0.1: 401 Unauthorized" in log
    assert "reveal refused: 403 PolicyRefusal (min_batch): layer 'enc1'" in log
    assert read_token(service.token_file) not in log


def test_deeply_nested_frame_header_is_a_400_frame_error_not_a_500(service, public):
    # Prepare: a header whose 'rows' nests past Python's recursion limit
    head = b'{"frame":"reveal-request/1","blob_lengths":[1],"rows":' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    # Execute
    answer = post_reveal(service, len(head).to_bytes(4, "big") + head + b"x")

    # Assert
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": "FrameError", "message": "reveal frame: the header nests deeper than 8 levels"}
    assert "Traceback" not in service.log.read_text()
    assert_good_reveal(service, public)


def test_a_layer_with_a_newline_is_a_400_and_forges_no_log_line(service, public):
    # Prepare
    forged = "2026-01-01 00:00:00,000 key-holder INFO reveal forged round 0 gradient enc1"
    request = replace(masked(public)[1], layer=f"enc1\n{forged}")

    # Execute
    answer = post_reveal(service, reveal_wire.encode_request(request))

    # Assert
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "FrameError"
    assert answer.json()["message"].startswith(
        f"reveal frame: 'layer' must match {reveal_wire.IDENTIFIER.pattern} (a short identifier), got 'enc1\\n")
    assert not any(line.startswith(forged) for line in service.log.read_text().splitlines())


def test_log_safe_escapes_every_control_character():
    from hetrain.participants.key_holder_service import log_safe

    assert log_safe("enc1\nforged\r\x1b[2K\u2028end") == "enc1\\nforged\\r\\x1b[2K\\u2028end"


def test_a_connection_that_never_finishes_its_headers_is_closed(service):
    # Prepare
    from hetrain.participants.http_timeouts import HEADER_TIMEOUT
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT + 5) as sock:
        sock.sendall(b"POST /v1/reveal HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        start = time.monotonic()

        # Execute: wait for the server to close (recv returns b"") or for our own timeout
        try:
            closed = sock.recv(1024) == b""
        except TimeoutError:
            closed = False

    # Assert
    assert closed, f"the service kept a half-sent request open for {HEADER_TIMEOUT + 5} s"
    assert time.monotonic() - start <= HEADER_TIMEOUT + 2


def test_budget_exhausted_is_403_and_the_service_keeps_serving(tmp_path, demo_data):
    # Prepare: a budget of 2 decryptions
    config = service_config(tmp_path, demo_data, budget=2)
    with running_service(config, tmp_path) as small:
        public = ckks.load_public_context(small.client().public_context())
        _, request, _ = masked(public, n_blobs=3)

        # Execute
        answer = post_reveal(small, reveal_wire.encode_request(request))
        with pytest.raises(BudgetExhausted, match=r"0 of the budget of 2 decryptions are used and this request needs 3"):
            small.client().reveal(request)

        # Assert
        assert (answer.status_code, answer.json()["error"], answer.json()["rule"]) == (403, "BudgetExhausted",
                                                                                      "decryption_budget")
        assert_good_reveal(small, public)


# ---- command line ------------------------------------------------------------------------------


def test_token_command_writes_a_token_once_and_says_where(tmp_path, capsys):
    # Prepare
    from hetrain.cli import main

    path = tmp_path / "kh.token"

    # Execute
    codes = main(["key-holder", "token", str(path)]), main(["key-holder", "token", str(path)])

    # Assert
    out = capsys.readouterr().out.splitlines()
    assert codes == (0, 0)
    assert out[0].startswith(f"wrote a new bearer token in {path} (mode 0600)")
    assert out[1].startswith(f"kept the existing bearer token in {path}")
    assert read_token(path)


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "s.pem"], r"--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], r"--tls-client-ca needs --tls-cert and --tls-key"),
    (["--max-body-mb", "0"], r"--max-body-mb must be in \(0, 4096\]; got 0.0"),
    (["--port", "70000"], r"--port must be in \[0, 65535\]; got 70000"),
], ids=["cert-without-key", "client-ca-without-cert", "zero-body", "port"])
def test_serve_refuses_inconsistent_options_before_touching_the_key(tmp_path, capsys, args, message):
    # Prepare
    from hetrain.cli import main

    # Execute
    code = main(["key-holder", "serve", "missing.yaml", "--key-dir", str(tmp_path / "kh"), *args])

    # Assert
    assert code == 1
    assert re.search(r"^hetrain: error: ConfigError: " + message, capsys.readouterr().err)
    assert not (tmp_path / "kh").exists()


# ---- transport ---------------------------------------------------------------------------------


def test_unreachable_service_raises_key_holder_unreachable_after_the_retries_quickly():
    # Prepare: nothing listens on this port
    url = f"http://127.0.0.1:{free_port()}"
    client = HttpKeyHolderClient(url, "t" * 43, timeout_s=0.5, retries=2, backoff_s=0.05,
                                 resume_hint="hetrain train cfg.yaml --run-dir runs/x --resume")

    # Execute
    start = time.perf_counter()
    with pytest.raises(KeyHolderUnreachable) as exc_info:
        client.public_context()
    elapsed = time.perf_counter() - start

    # Assert
    assert str(exc_info.value).startswith(f"key holder at {url} did not answer GET /v1/public-context after 3 attempt(s) "
                                          f"(last error: ConnectError")
    assert str(exc_info.value).endswith("resume with `hetrain train cfg.yaml --run-dir runs/x --resume`")
    assert elapsed < 3


def test_service_that_accepts_but_never_answers_times_out_into_key_holder_unreachable():
    # Prepare: a socket that listens (the kernel accepts) but never replies
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        client = HttpKeyHolderClient(f"http://127.0.0.1:{silent.getsockname()[1]}", "t" * 43, timeout_s=0.2,
                                     retries=1, backoff_s=0.01)

        # Execute / Assert
        with pytest.raises(KeyHolderUnreachable, match=r"after 2 attempt\(s\) \(last error: ReadTimeout"):
            client.audit_summary()


def scripted_client(statuses: list[int]) -> tuple[HttpKeyHolderClient, list[int]]:
    """A client whose transport answers with `statuses` in turn (the last one repeats)."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(len(seen))
        status = statuses[min(len(seen) - 1, len(statuses) - 1)]
        body = {"allow": 0, "refuse": 0, "rules": {}, "sigma": 0.0, "decryptions_used": 5, "budget": 9} \
            if status == 200 else {"error": "BundleError", "message": "bad"}
        return httpx.Response(status, json=body)

    client = HttpKeyHolderClient("http://127.0.0.1:9", "t" * 43, retries=3, backoff_s=0.0)
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    return client, seen


def test_5xx_answers_are_retried_until_one_succeeds():
    # Prepare
    client, seen = scripted_client([503, 500, 200])

    # Execute
    used = client.decryptions_used

    # Assert
    assert (used, len(seen)) == (5, 3)


def test_4xx_answers_are_never_retried():
    # Prepare
    client, seen = scripted_client([400])

    # Execute
    with pytest.raises(BundleError, match=r"^bad$"):
        client.audit_summary()

    # Assert
    assert len(seen) == 1


# ---- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_service_answers_a_client_with_a_certificate_and_refuses_one_without(tmp_path, demo_data):
    # Prepare
    from tests.tls_certs import make_tls_files

    tls = make_tls_files(tmp_path / "tls")
    config = service_config(tmp_path, demo_data)
    import ssl

    verify = ssl.create_default_context(cafile=str(tls["ca"]))
    verify.load_cert_chain(str(tls["client"]), str(tls["client_key"]))
    with running_service(config, tmp_path, "--tls-cert", str(tls["server"]), "--tls-key", str(tls["server_key"]),
                         "--tls-client-ca", str(tls["ca"]), scheme="https", verify=verify) as secure:
        with_cert = secure.client(tls_ca=tls["ca"], tls_cert=tls["client"], tls_key=tls["client_key"])
        without_cert = secure.client(tls_ca=tls["ca"])
        plain = HttpKeyHolderClient(secure.url.replace("https", "http"), read_token(secure.token_file), retries=0)

        # Execute
        public = ckks.load_public_context(with_cert.public_context())
        enc, request, masks = masked(public)
        response = with_cert.reveal(request)

        # Assert
        np.testing.assert_allclose(unblind(enc, response, masks)[:, 0], VALUES, rtol=0, atol=8 * response.sigma + 1e-6)
        with pytest.raises(KeyHolderUnreachable, match=r"also needs key_holder.tls_cert and tls_key"):
            without_cert.audit_summary()
        with pytest.raises(KeyHolderUnreachable):
            plain.audit_summary()
        assert with_cert.audit_summary()["allow"] == 1
        for client in (with_cert, without_cert, plain):
            client.close()


# ---- the trainer against the service -----------------------------------------------------------


def trainer_config(service: Service, folder: Path, demo: Path, rounds: int) -> Path:
    """The service's config plus a key_holder section pointing at it."""
    raw = yaml.safe_load(service.config.read_text())
    raw["train"]["rounds"] = rounds
    raw["key_holder"] = {"url": service.url, "token_file": str(service.token_file), "timeout_s": 60, "retries": 2}
    path = folder / "trainer.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


TRAINER_ROUND = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from hetrain.bench.pipeline import prepare, rounds
    config, run = Path(sys.argv[1]), Path(sys.argv[2])
    start = time.perf_counter()
    prepare(config, run)
    row = rounds(config, run, 1, 1)[0]
    print(json.dumps({"key_holder_imported": "hetrain.participants.key_holder" in sys.modules,
                      "test_accuracy": row["test_accuracy"], "decryptions": row["decryptions"],
                      "reveals": row["reveals"], "seconds": time.perf_counter() - start}))
""")


def test_trainer_process_trains_a_round_against_the_service_without_importing_the_key_holder(service, tmp_path,
                                                                                          demo_data):
    # Prepare: a separate trainer process (this test process has imported the key holder for other tests)
    config = trainer_config(service, tmp_path, demo_data, rounds=1)

    # Execute
    out = subprocess.run([sys.executable, "-c", TRAINER_ROUND, str(config), str(tmp_path / "run")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)

    # Assert
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["key_holder_imported"] is False
    assert result["decryptions"] > 0 and result["reveals"] > 0
    assert result["test_accuracy"] >= 0.85
    assert not (tmp_path / "run" / "key_holder").exists()  # no key material in the trainer's run directory


@pytest.mark.slow
def test_hetrain_train_with_key_holder_url_runs_end_to_end_in_a_fresh_process(service, tmp_path, demo_data):
    # Prepare: the user's view: `hetrain train` in a fresh process, its key holder a service
    import os

    config = trainer_config(service, tmp_path, demo_data, rounds=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    script = ("import sys; from hetrain.cli import main; code = main(sys.argv[1:]); "
              "print('key holder imported:', 'hetrain.participants.key_holder' in sys.modules); sys.exit(code)")

    # Execute
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, "train", str(config), "--run-dir", str(tmp_path / "run")],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - start

    # Assert
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert "hetrain: run 'breast_cancer' finished" in out.stdout
    assert "key holder imported: False" in out.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["final"]["test_accuracy"] >= 0.9 and metrics["final"]["decryptions"] > 0
    assert not (tmp_path / "run" / "key_holder").exists()
    print(f"end-to-end hetrain train against the service: {elapsed:.1f} s")


def test_training_stopped_by_an_unreachable_service_resumes_once_it_is_back(tmp_path, demo_data):
    # Prepare: round 1 against the service, then the service goes away
    from hetrain.bench.pipeline import prepare, rounds
    from hetrain.runtime import forget_key_holders

    config, run = service_config(tmp_path, demo_data), tmp_path / "run"
    with running_service(config, tmp_path) as first:
        trainer = trainer_config(first, tmp_path, demo_data, rounds=2)
        raw = yaml.safe_load(trainer.read_text())
        raw["key_holder"].update(retries=1, backoff_s=0.1, timeout_s=10)
        trainer.write_text(yaml.safe_dump(raw))
        forget_key_holders()
        prepare(trainer, run)
        rounds(trainer, run, 1, 1)

    # Execute: round 2 fails fast; after a restart on the same port and key, it runs from round 1's checkpoint
    with pytest.raises(KeyHolderUnreachable, match=r"after 2 attempt\(s\).*resume with `hetrain train .* --resume`"):
        rounds(trainer, run, 2, 2)
    with running_service(config, tmp_path, port=int(first.url.rsplit(":", 1)[1])):
        row = rounds(trainer, run, 2, 2)[0]
    forget_key_holders()

    # Assert
    assert row["round"] == 2 and row["decryptions"] > 0
    assert (run / "checkpoints" / "round-00002").is_dir()
