"""The key holder as its own process: a small versioned HTTP API around hetrain.participants.key_holder.

`hetrain key-holder serve CONFIG --key-dir DIR` runs it. The service reads the policy, the layer
shapes and the CKKS parameters from the config it was started with, never from a request, and
its process is the only one that loads the secret key.

  GET  /v1/health          no auth: status, key id and the body limit
  GET  /v1/public-context  the public context (bytes)
  POST /v1/reveal          a reveal frame (hetrain.mpc_ops.reveal.frame) in, a response frame out
  GET  /v1/audit-summary   the audit log's public counts

Every other endpoint needs `Authorization: Bearer <token>`. Status codes: 401 bad or missing
token, 413 body over the limit, 400 malformed frame or ciphertext, 403 policy refusal or budget
exhausted, 409 foreign key. A refused request is logged in one line, without a traceback, and
the service keeps serving.
"""

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import ssl
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from hetrain.mpc_ops.reveal import frame as reveal_wire
from hetrain.core.config import RunConfig
from hetrain.core.errors import BudgetExhausted, ConfigError, ForeignKeyError, FrameError, HetrainError, PolicyRefusal
from hetrain.mpc_ops.layers.packing import next_pow2
from hetrain.core.shapes import cipher_layer_shapes, reveal_shapes
from hetrain.mpc_ops.reveal.protocol import RevealRequest
from hetrain.mpc_ops.reveal.token_file import create_token, read_token

from hetrain.participants.key_holder import SECRET_FILE, KeyHolder

log = logging.getLogger("hetrain.key_holder")
RECENT_RESPONSES = 32  # answers kept per request_id, so a retried request is not decrypted twice
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_safe(value) -> str:
    """`value` as one log line: control characters (newlines included) escaped as \\xNN / \\uNNNN."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def max_reveal_blobs(cfg: RunConfig) -> int:
    """Most ciphertexts one reveal of this config can carry: one per output and slot chunk of a batch.
    A chunk holds slots/seg samples (seg: the widest owner's feature count, rounded up to a power of
    two), and a batch is shorter than 2·batch_size (a short tail joins the batch before it)."""
    seg = next_pow2(max(len(o.features) for o in cfg.data.owners))
    per_ct = max(1, cfg.ckks.params().slots // seg)
    outputs = max(s.out_features for s in cipher_layer_shapes(cfg).values())
    return outputs * math.ceil((2 * cfg.train.batch_size - 1) / per_ct)


def default_max_body(cfg: RunConfig) -> int:
    """The reveal body limit: the largest reveal the config can make, in bytes."""
    return reveal_wire.max_request_bytes(max_reveal_blobs(cfg), cfg.ckks.params().max_ciphertext_bytes,
                                         max_rows=2 * cfg.train.batch_size - 1)


def error_answer(exc: HetrainError) -> tuple[int, dict]:
    """HTTP status and JSON body for a refused reveal; the client maps them back to the same exception."""
    if isinstance(exc, PolicyRefusal):
        error = "BudgetExhausted" if isinstance(exc, BudgetExhausted) else "PolicyRefusal"
        return 403, {"error": error, "rule": exc.rule, "message": exc.detail}
    if isinstance(exc, ForeignKeyError):
        return 409, {"error": "ForeignKeyError", "message": str(exc)}
    return 400, {"error": type(exc).__name__, "message": str(exc)}  # BundleError, FrameError: a bad request


class _Refused(Exception):
    """A request refused before it reaches the key holder (auth, size)."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error = status, error


class RevealDesk:
    """The key holder behind one lock (it keeps budget and audit state), with a short replay memory."""

    def __init__(self, holder: KeyHolder, max_blobs: int, max_blob_bytes: int):
        self.holder, self.max_blobs, self.max_blob_bytes = holder, max_blobs, max_blob_bytes
        self.public_context = holder.public_context()
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    def reveal(self, body: bytes) -> tuple[bytes, RevealRequest, bool]:
        """Decode, reveal, encode; a retry of a request already answered gets the same answer again."""
        request = reveal_wire.decode_request(body, max_blobs=self.max_blobs, max_blob_bytes=self.max_blob_bytes)
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            seen = self._recent.get(request.request_id)
            if seen is not None:
                if seen[0] != digest:
                    raise FrameError(
                        f"reveal frame: request_id {request.request_id!r} was already used for a different request")
                return seen[1], request, True
            frame = reveal_wire.encode_response(self.holder.reveal(request))
            self._recent[request.request_id] = (digest, frame)
            while len(self._recent) > RECENT_RESPONSES:
                self._recent.popitem(last=False)
            return frame, request, False

    def audit_summary(self) -> dict:
        with self._lock:
            return self.holder.audit_summary()


def build_app(holder: KeyHolder, token: str, *, max_body: int, max_blobs: int, max_blob_bytes: int) -> FastAPI:
    """The HTTP API around one key holder."""
    desk = RevealDesk(holder, max_blobs, max_blob_bytes)
    expected = f"Bearer {token}".encode()
    app = FastAPI(title="hetrain key holder", docs_url=None, redoc_url=None, openapi_url=None)

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise _Refused(401, "Unauthorized", "missing or wrong bearer token")

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> JSONResponse:
        client = request.client.host if request.client else "?"
        log.warning("%s %s from %s: %d %s (%s)", request.method, log_safe(request.url.path), log_safe(client),
                    exc.status, exc.error, log_safe(exc))
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.error, "message": str(exc)}, exc.status, headers=headers)

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "key_id": holder.key_id, "max_body_bytes": max_body}

    @app.get("/v1/public-context")
    def public_context(request: Request) -> Response:
        authorize(request)
        return Response(desk.public_context, media_type="application/octet-stream")

    @app.get("/v1/audit-summary")
    def audit_summary(request: Request) -> dict:
        authorize(request)
        return desk.audit_summary()

    @app.post("/v1/reveal")
    async def reveal(request: Request) -> Response:
        authorize(request)
        body = await read_body(request, max_body)
        start = time.perf_counter()
        try:
            frame, req, replay = await run_in_threadpool(desk.reveal, body)
        except HetrainError as exc:
            status, answer = error_answer(exc)
            log.warning("reveal refused: %d %s%s: %s", status, answer["error"],
                        f" ({log_safe(answer['rule'])})" if "rule" in answer else "", log_safe(answer["message"]))
            return JSONResponse(answer, status)
        log.info("reveal %s round %d %s %s: %d ciphertexts %s in %.0f ms", log_safe(req.request_id[:12]), req.round,
                 log_safe(req.kind), log_safe(req.layer), len(req.blobs), "replayed" if replay else "decrypted", 1000 * (time.perf_counter() - start))
        return Response(frame, media_type=reveal_wire.MEDIA_TYPE)

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as Content-Length or the bytes received pass `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Refused(400, "BadRequest", f"Content-Length must be a byte count, got {declared!r:.40}")
        if int(declared) > limit:
            raise _Refused(413, "PayloadTooLarge", f"the body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # the server discards the rest of the body after answering
            raise _Refused(413, "PayloadTooLarge", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_serve_options(*, port: int = 8765, tls_cert: str | None = None, tls_key: str | None = None,
                        tls_client_ca: str | None = None, max_body_mb: float | None = None) -> None:
    """Raise ConfigError for inconsistent `serve` options (the CLI calls it before it loads the config)."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together (the service's certificate and its key)")
    if tls_client_ca and not tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked over TLS")
    if max_body_mb is not None and not 0 < max_body_mb <= 4096:
        raise ConfigError(f"--max-body-mb must be in (0, 4096]; got {max_body_mb}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535]; got {port}")


def serve(cfg: RunConfig, config_path: Path, key_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8765,
          token_path: str | Path | None = None, tls_cert: str | None = None, tls_key: str | None = None,
          tls_client_ca: str | None = None, max_body_mb: float | None = None) -> int:
    """Load the key for a loaded config (hetrain.configure.load_config), then serve until interrupted
    (`hetrain key-holder serve`)."""
    import uvicorn

    check_serve_options(port=port, tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
                        max_body_mb=max_body_mb)
    key_dir = Path(key_dir).resolve()
    existed = (key_dir / SECRET_FILE).exists()
    holder = KeyHolder.open_or_create(key_dir, cfg.ckks.params(), cfg.policy, reveal_shapes(cfg))
    token_path = Path(token_path or key_dir / "service.token").resolve()
    created = create_token(token_path)
    token = read_token(token_path)
    max_blobs = max_reveal_blobs(cfg)
    max_body = int(max_body_mb * 2**20) if max_body_mb else default_max_body(cfg)
    app = build_app(holder, token, max_body=max_body, max_blobs=max_blobs,
                    max_blob_bytes=cfg.ckks.params().max_ciphertext_bytes)

    _log_to_stderr()
    scheme = "https" if tls_cert else "http"
    print(f"hetrain key-holder: key {holder.key_id} {'loaded from' if existed else 'created in'} {key_dir}; "
          f"policy, layer shapes and CKKS parameters from {config_path}")
    print(f"hetrain key-holder: bearer token in {token_path} ({'created now, ' if created else ''}mode 0600); "
          f"give the trainer this file as key_holder.token_file")
    if not _is_loopback(host) and not tls_cert:
        print(f"hetrain key-holder: warning: {host} is not a loopback address and TLS is off, so the token and the "
              f"masked ciphertexts cross the network in the clear; pass --tls-cert and --tls-key", file=sys.stderr)
    print(f"hetrain key-holder: serving {scheme}://{host}:{port}/v1 (max body {max_body / 2**20:.1f} MB, "
          f"{max_blobs} ciphertexts per reveal{', client certificates required' if tls_client_ca else ''}); "
          f"Ctrl-C stops it", flush=True)
    from hetrain.participants.http_timeouts import MAX_HEADER_BYTES, header_timeout_protocol

    # h11 with a header timeout (uvicorn times out idle keep-alive connections only) and a small
    # limit on an unfinished request line and headers
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, http=header_timeout_protocol(), lifespan="off", access_log=False,
        log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=5, server_header=False,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
        ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
    ))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    print("hetrain key-holder: stopped", flush=True)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_to_stderr() -> None:
    """One line per request decision: ids, kinds, counts and timings, never values, ciphertexts or the token."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s key-holder %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
