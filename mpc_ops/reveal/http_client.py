"""The trainer's client of the key-holder service (`hetrain key-holder serve`): same methods as the
in-process client, bytes over HTTP, refusals mapped back to the same named exceptions.

Connection errors, timeouts and 5xx answers are retried with exponential backoff; a 4xx never
is (a refusal or a bad request does not change on retry).
"""

import json
import logging
import ssl
import time
from pathlib import Path

import httpx

from hetrain.mpc_ops.reveal import frame as reveal_wire
from hetrain.core.config import KeyHolderConfig
from hetrain.core.errors import (BudgetExhausted, BundleError, DigestMismatch, ForeignKeyError, FrameError, HetrainError,
                     KeyHolderRejected, KeyHolderUnreachable, PolicyRefusal)
from hetrain.mpc_ops.reveal.protocol import RevealRequest, RevealResponse
from hetrain.mpc_ops.reveal.token_file import read_token

log = logging.getLogger("hetrain")

# 400 answers name one of these; anything else maps to BundleError.
_BAD_REQUEST = {cls.__name__: cls for cls in (BundleError, FrameError, DigestMismatch)}


class HttpKeyHolderClient:
    """Talks to one key-holder service; holds no key material, only the bearer token."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, resume_hint: str | None = None):
        self.url, self.retries, self.backoff_s = url.rstrip("/"), retries, backoff_s
        self.resume_hint = resume_hint or "hetrain train CONFIG --run-dir RUN_DIR --resume"
        # trust_env=False: the bearer token goes straight to the service, never through an
        # HTTP(S)_PROXY from the environment.
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False,
                                  verify=_tls_context(tls_ca, tls_cert, tls_key) if self.url.startswith("https") else True,
                                  headers={"Authorization": f"Bearer {token}"})
        self._used: int | None = None
        self._hint = " (a service started with --tls-client-ca also needs key_holder.tls_cert and tls_key)" \
            if self.url.startswith("https") and not tls_cert else ""

    @classmethod
    def from_config(cls, cfg: KeyHolderConfig, resume_hint: str | None = None) -> "HttpKeyHolderClient":
        return cls(cfg.url, read_token(cfg.token_file), timeout_s=cfg.timeout_s, retries=cfg.retries,
                   backoff_s=cfg.backoff_s, tls_ca=cfg.tls_ca, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
                   resume_hint=resume_hint)

    # ---- the KeyHolderClient methods --------------------------------------------------------
    def health(self) -> dict:
        return self._call("GET", "/v1/health").json()

    def public_context(self) -> bytes:
        return self._call("GET", "/v1/public-context").content

    def reveal(self, request: RevealRequest) -> RevealResponse:
        """Send the request frame; decode and check the response frame against the request."""
        self._used = None  # a refused or failed reveal may still have been charged
        body = self._call("POST", "/v1/reveal", content=reveal_wire.encode_request(request),
                          headers={"Content-Type": reveal_wire.MEDIA_TYPE}).content
        response = reveal_wire.decode_response(body, request=request)
        self._used = response.decryptions_used
        return response

    def audit_summary(self) -> dict:
        summary = self._call("GET", "/v1/audit-summary").json()
        self._used = int(summary["decryptions_used"])
        return summary

    @property
    def decryptions_used(self) -> int:
        """As of the last reveal this client made; asked from the service when unknown."""
        if self._used is None:
            self.audit_summary()
        return self._used

    def close(self) -> None:
        self._http.close()

    # ---- transport --------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("key holder %s%s: %s; retry %d of %d in %.1f s", self.url, path, last, attempt,
                            self.retries, delay)
                time.sleep(delay)
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connect, read, write, timeout, protocol
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise self._refusal(response, path, len(kwargs.get("content") or b""))
            return response
        raise KeyHolderUnreachable(
            f"key holder at {self.url} did not answer {method} {path} after {self.retries + 1} attempt(s) "
            f"(last error: {last}){self._hint}; once the key holder is back (restart its `hetrain key-holder serve`), "
            f"resume with `{self.resume_hint}`"
        )

    def _refusal(self, response: httpx.Response, path: str, sent: int) -> HetrainError:
        """The named exception for a 4xx answer, so the trainer behaves as with the in-process key holder."""
        status = response.status_code
        try:
            body = response.json()
            error, message, rule = str(body.get("error", "")), str(body.get("message", "")), body.get("rule")
        except (ValueError, AttributeError):
            error, message, rule = "", response.text[:200], None
        if status == 403 and error == "BudgetExhausted":
            return BudgetExhausted(message)
        if status == 403 and error == "PolicyRefusal" and isinstance(rule, str):
            return PolicyRefusal(rule, message)
        if status == 409:
            return ForeignKeyError(message)
        if status == 400:
            return _BAD_REQUEST.get(error, BundleError)(message)
        if status == 401:
            return KeyHolderRejected(status, f"key holder at {self.url} refused the bearer token (HTTP 401): "
                                             f"key_holder.token_file must hold the token of the service's --token-file")
        if status == 413:
            return KeyHolderRejected(status, f"key holder at {self.url} refused a {sent}-byte request to {path} as too "
                                             f"large (HTTP 413: {message}); restart it with a larger --max-body-mb")
        return KeyHolderRejected(status, f"key holder at {self.url} answered {path} with HTTP {status}: "
                                         f"{error or 'error'}: {message or json.dumps(response.text[:200])}")


def _tls_context(ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> ssl.SSLContext:
    """Verify the service against `ca` (or the system store); present a client certificate for mTLS."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert:
        context.load_cert_chain(str(cert), str(key))
    return context
