"""The key holder: the only code in hetrain that creates, loads or uses a secret key.

It makes the CKKS context, publishes the public context, and answers blinded reveal
requests: policy check, budget check, decryption, flooding noise, audit entry.
Its files live under RUN_DIR/key_holder/ and nowhere else.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import tenseal as ts

from hetrain.mpc_ops.crypto import ckks, context_record, flooding, wire
from hetrain.mpc_ops.reveal import dp
from hetrain.core import store
from hetrain.core.config import PolicyConfig
from hetrain.core.errors import BudgetExhausted, BundleError, ForeignKeyError, PolicyRefusal, SecurityParameterError
from hetrain.core.failpoints import failpoint
from hetrain.core.params import CkksParams
from hetrain.core.shapes import LinearShape, policy_uses_tiled
from hetrain.mpc_ops.reveal.policy import check_reveal
from hetrain.mpc_ops.reveal.protocol import RevealRequest, RevealResponse, check_request
from hetrain.mpc_ops.reveal.ledger import LEDGER_FILE, RevealLedger
from hetrain.mpc_ops.crypto import ring
from hetrain.mpc_ops.reveal import verified
from hetrain.participants.verified_keys import VerifiedKeys

SECRET_FILE = "secret_context.bin"
# Worst-case error of a verified result, Σ_j round(W_jk·Δ)·ct_j + Enc_Δ²(r) decoded at Δ²: each fresh
# encryption's error over Δ, times ‖W_k‖₁ ≤ 16 (weights N(0, 1/d)); measured below 2^-36 at N = 8192,
# scale 2^50 (tests/test_verified_reveal.py), so 2^-30 is a 64x margin.
VERIFIED_ERROR_BOUND = 2.0 ** -30
STATE_FILE = "state.json"
AUDIT_FILE = "audit.jsonl"


def _params_record(params: CkksParams) -> dict:
    """How the key's CKKS parameters are recorded in state.json (compared on every reopen)."""
    return {"poly_modulus_degree": params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes), "scale_bits": params.scale_bits}


def _plain(value):
    """A request field as the audit log may record it: a short JSON scalar, else a truncated repr."""
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 200):
        return value
    return repr(value)[:200]


class KeyHolder:
    """Holds the secret key, the decryption budget and the audit log."""

    def __init__(self, directory: Path, context: ts.Context, params: CkksParams,
                 policy: PolicyConfig, shapes: dict[str, LinearShape]):
        self.directory, self._context, self.params = Path(directory), context, params
        self.policy, self.shapes = policy, shapes
        self.key_id = ckks.key_id(context)
        state = self._read_state()
        self.decryptions_used = int(state.get("decryptions_used", 0))
        self._last_hash = state.get("audit_head", "0" * 64)
        self._seq = int(state.get("audit_seq", 0))
        self.ledger = RevealLedger(self.directory / LEDGER_FILE, policy, shapes)
        self._recover_unrecorded_audit()
        # the policy implies the engine: anything beyond one first-layer reveal with plaintext labels is tiled
        self._tiled = policy_uses_tiled(policy)
        # hybrid: every revealed blob went through exactly one ct × plain product; tiled: 1 to depth products
        self._layout = ckks.revealed_layouts(context) if self._tiled else ckks.product_layout(context)

    # ---- lifecycle -------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, directory: Path, params: CkksParams, policy: PolicyConfig,
                       shapes: dict[str, LinearShape]) -> "KeyHolder":
        """Load the key in `directory`, or make a new one if there is none yet."""
        directory = Path(directory)
        secret = directory / SECRET_FILE
        if secret.exists():
            context = ts.context_from(secret.read_bytes())
            context_record.record(context, "key_holder.load")
            if not context.is_private():
                raise BundleError(f"{secret}: holds no secret key")
            stored = json.loads((directory / STATE_FILE).read_text()).get("params") \
                if (directory / STATE_FILE).exists() else None
            wanted = _params_record(params)
            if stored != wanted:
                raise SecurityParameterError(
                    f"{directory}: the stored key was made with {stored}, but the config asks for "
                    f"{wanted}; use a new run directory (a new key) for new CKKS parameters"
                )
            return cls(directory, context, params, policy, shapes)
        params.validate()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
        context.global_scale = 2.0**params.scale_bits
        context.generate_galois_keys()
        context_record.record(context, "key_holder.create")
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        # state.json first: a secret key on disk always has its recorded parameters beside it, so a
        # crash between the two writes leaves no key (a new one is made), never an unusable one.
        holder = cls(directory, context, params, policy, shapes)
        holder._write_state()
        failpoint("keyholder.after_key_write")
        store.write_bytes(secret, context.serialize(save_secret_key=True), mode=0o600)
        return holder

    @staticmethod
    def rotate(directory: Path) -> str:
        """Retire the key in `directory`: its audit log and state move to retired/<key id>/, its
        secret key is deleted. The next open_or_create makes a fresh key with a fresh budget."""
        directory = Path(directory)
        secret = directory / SECRET_FILE
        if not secret.exists():
            raise BundleError(f"{directory}: there is no key to rotate (no {SECRET_FILE})")
        state = json.loads((directory / STATE_FILE).read_text()) if (directory / STATE_FILE).exists() else {}
        key_id = state.get("key_id") or ckks.key_id(ts.context_from(secret.read_bytes()))
        retired = directory / "retired" / key_id
        retired.mkdir(parents=True, exist_ok=True)
        for name in (AUDIT_FILE, STATE_FILE):
            if (directory / name).exists():
                (directory / name).replace(retired / name)
        store.fsync_dir(retired)
        secret.unlink()  # a retired key must never decrypt again
        store.fsync_dir(directory)
        return key_id

    def public_context(self) -> bytes:
        """The context without its secret key: relin and Galois keys only."""
        return self._context.serialize(save_secret_key=False)

    @property
    def budget(self) -> int:
        return self.policy.flooding.budget

    # ---- the reveal ------------------------------------------------------------------
    def reveal(self, request: RevealRequest) -> RevealResponse:
        """Check the policy and budget, decrypt the requested slots, flood, audit."""
        slots = self.params.slots
        if self.policy.trainer == "untrusted":  # nothing the trainer declares is checkable here
            refusal = PolicyRefusal("untrusted_trainer", "policy.trainer is untrusted: this key holder decrypts only "
                                                         "verified reveals (reveal_verified), never a declared one")
            self._audit(request, "refuse", rule=refusal.rule, message=str(refusal))
            raise refusal
        try:
            check_request(request, self._layout)  # types, ranges and blob structure, before any decryption
            if request.key_id != self.key_id:
                raise ForeignKeyError(
                    f"reveal request names key id {request.key_id}; this key holder's is {self.key_id}"
                )
            check_reveal(self.policy, self.shapes, request)
            self.ledger.check(request)
            if self.decryptions_used + len(request.blobs) > self.budget:
                raise BudgetExhausted(
                    f"{self.decryptions_used} of the budget of {self.budget} decryptions are used and "
                    f"this request needs {len(request.blobs)}; rotate the key with `hetrain rotate-key RUN_DIR`, "
                    f"then resume (the owners re-encrypt under the new key)"
                )
            # Charge the budget and the ledger before decrypting: a decryption leaks whether or not
            # it is returned.
            self.decryptions_used += len(request.blobs)
            self.ledger.record(request)
            decrypted = [self._decrypt(b, s, c, slots) for b, s, c in zip(request.blobs, request.stride, request.counts)]
            values = [v for v, _ in decrypted]
            # B grows with the levels the circuit consumed, read from the ciphertexts themselves
            # (a trainer cannot make a deep result look shallow: every product costs a level)
            depth = max(level for _, level in decrypted)
            sigma = flooding.flood_sigma(
                self.policy.flooding.security_bits, self.budget,
                flooding.error_bound(self.params.scale_bits, self.params.poly_modulus_degree, max(request.stride),
                                     depth=depth, tiled=self._tiled),
            )
            details = {}
            if request.kind == "gradient" and self.policy.dp is not None:
                # DP noise on the values as decrypted: the trainer caps its gradient gain at 1, so the
                # noise it sees after dividing by the gain is at least dp_sigma.
                details["dp_sigma"] = dp.sigma(self.policy.dp, self.shapes[request.layer].in_features,
                                               request.aggregate)
                values = [dp.add_noise(v, details["dp_sigma"]) for v in values]
            # Flood first, then check: no decision and no message depends on an un-flooded value
            # (a refusal on raw values would be a comparison oracle a binary search over masks reads).
            flooded = [flooding.flood(v, sigma) for v in values]
            self._check_headroom(flooded)
        except (PolicyRefusal, BundleError) as exc:
            self._audit(request, "refuse", rule=getattr(exc, "rule", type(exc).__name__), message=str(exc))
            raise
        self._audit(request, "allow", sigma=sigma, slots_revealed=int(sum(request.counts)), **details)
        return RevealResponse(request.request_id, flooded, sigma, self.decryptions_used)

    def _decrypt(self, blob: bytes, stride: int, count: int, slots: int) -> tuple[np.ndarray, int]:
        """The requested slots and the depth (levels consumed) of the ciphertext."""
        full = wire.with_size(blob, slots, max_slots=slots)
        try:
            vector = ts.ckks_vector_from(self._context, full)
            depth = len(self.params.coeff_mod_bit_sizes) - 1 - vector.ciphertext()[0].coeff_modulus_size()
            values = np.asarray(vector.decrypt())[: stride * count : stride]
        except (RuntimeError, ValueError, TypeError) as exc:  # TenSEAL/SEAL reject a corrupt payload
            raise BundleError(f"ciphertext cannot be loaded or decrypted: {exc}") from None
        return values, max(1, depth)

    def _check_headroom(self, flooded: list[np.ndarray]) -> None:
        """Refuse flooded values beyond the headroom (a foreign key decrypts to ~1e31); the message
        names the limit only, never a value."""
        limit = self.params.headroom
        if not all(np.all(np.isfinite(v)) and np.all(np.abs(v) <= limit) for v in flooded):
            raise ForeignKeyError(
                f"a flooded decrypted value is beyond the headroom of {limit:g}: "
                f"the ciphertext was made under another key or overflowed its scale"
            )

    # ---- the verified reveal (policy.trainer: untrusted) ---------------------------------------
    def _verified_keys(self) -> VerifiedKeys:
        if getattr(self, "_vk", None) is None:
            primes = ring.coeff_modulus(self.params.poly_modulus_degree, self.params.coeff_mod_bit_sizes)
            self._vk = VerifiedKeys(self.directory, primes[:-1], self.params.poly_modulus_degree)
        return self._vk

    def mac_key(self) -> np.ndarray:
        """The MAC key the owners tag their ciphertexts with (owners only: a trainer holding it could forge)."""
        return self._verified_keys().mac_key.copy()

    def register_tags(self, owner: str, entries: dict) -> int:
        """An owner's tags for the ciphertexts it published (owners only)."""
        return self._verified_keys().register(owner, entries)

    def input_weights(self, layer: str) -> np.ndarray:
        """The weights of the reveal point `layer` under policy.trainer: untrusted (public, drawn here)."""
        if layer not in self.policy.reveals or layer not in self.shapes:
            raise PolicyRefusal("undeclared_reveal_point", f"layer '{layer}' is not a declared reveal point "
                                                           f"(allowed: {sorted(self.policy.reveals)})")
        shape = self.shapes[layer]
        return self._verified_keys().weights(layer, shape.in_features, shape.out_features)

    def reveal_verified(self, request: "verified.VerifiedRevealRequest") -> RevealResponse:
        """Check the MAC of Σ_j m_jk·ct_j + M_k against the owners' tags, then decrypt, flood, audit."""
        try:
            if self.policy.trainer != "untrusted":
                raise PolicyRefusal("verified_off", "verified reveals need policy.trainer: untrusted")
            shape = self.shapes.get(getattr(request, "layer", None))
            verified.check_fields(request, shape.out_features if shape else 1)
            if request.key_id != self.key_id:
                raise ForeignKeyError(f"reveal request names key id {request.key_id}; this key holder's is {self.key_id}")
            weights = self.input_weights(request.layer)
            coeffs = verified.read_checked(request.blob, verified.layout(self._context, self.params),
                                           float(self._context.global_scale))
            vk = self._verified_keys()
            n = vk.check(request, weights, float(self._context.global_scale), coeffs)
            if self.decryptions_used + 1 > self.budget:
                raise BudgetExhausted(f"{self.decryptions_used} of the budget of {self.budget} decryptions are used; "
                                      f"rotate the key with `hetrain rotate-key RUN_DIR`")
            vk.once(request)
            self.decryptions_used += 1
            try:
                values = np.asarray(ts.ckks_vector_from(self._context, bytes(request.blob)).decrypt())[:n]
            except (RuntimeError, ValueError, TypeError) as exc:
                raise BundleError(f"ciphertext cannot be loaded or decrypted: {exc}") from None
            sigma = flooding.flood_sigma(self.policy.flooding.security_bits, self.budget, VERIFIED_ERROR_BOUND)
            flooded = flooding.flood(values, sigma)  # before any check on the values: no unflooded comparison leaves
            if not np.all(np.isfinite(flooded)) or np.abs(flooded).max() > self.params.headroom:
                raise ForeignKeyError(f"a verified result is beyond the headroom of {self.params.headroom:g}")
        except (PolicyRefusal, BundleError) as exc:
            self._audit(request, "refuse", rule=getattr(exc, "rule", type(exc).__name__), message=str(exc))
            raise
        self._audit(request, "allow", sigma=sigma, slots_revealed=int(n), kind="verified_activation",
                    chunk=request.chunk, output=request.output)
        return RevealResponse(request.request_id, [flooded], sigma, self.decryptions_used)

    def audit_summary(self) -> dict:
        """Public counts from the audit log: reveals allowed and refused (by rule), σ, budget use."""
        totals = {"allow": 0, "refuse": 0, "rules": {}, "sigma": 0.0,
                  "decryptions_used": self.decryptions_used, "budget": self.budget}
        path = self.directory / AUDIT_FILE
        for line in path.read_text().splitlines() if path.exists() else []:
            entry = json.loads(line)
            totals[entry["decision"]] += 1
            if entry["decision"] == "refuse":
                totals["rules"][entry["rule"]] = totals["rules"].get(entry["rule"], 0) + 1
            totals["sigma"] = entry.get("sigma", totals["sigma"])
        totals["ledger"] = self.ledger.summary()
        return totals

    # ---- state and audit -------------------------------------------------------------
    def _read_state(self) -> dict:
        path = self.directory / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_state(self) -> None:
        store.write_json(self.directory / STATE_FILE, {
            "key_id": self.key_id, "decryptions_used": self.decryptions_used, "budget": self.budget,
            "audit_head": self._last_hash, "audit_seq": self._seq, "params": _params_record(self.params),
        }, mode=0o600)

    def _audit(self, request: RevealRequest, decision: str, **details) -> None:
        field = {name: _plain(getattr(request, name, None))
                 for name in ("request_id", "round", "kind", "layer", "aggregate")}
        blobs = getattr(request, "blobs", None)
        entry = {
            "seq": self._seq + 1, "time": time.time(), **field, "decision": decision,
            "ciphertexts": len(blobs) if isinstance(blobs, list) else None,
            "decryptions_used": self.decryptions_used, "budget": self.budget, "prev": self._last_hash,
            **details,
        }
        line = json.dumps(entry, sort_keys=True)
        fd = os.open(self.directory / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # also a log an older version created 0644
        with os.fdopen(fd, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
        self._seq, self._last_hash = self._seq + 1, hashlib.sha256(line.encode()).hexdigest()
        failpoint("keyholder.after_audit_append")
        self._write_state()

    def _recover_unrecorded_audit(self) -> None:
        """Adopt entries a crash left in audit.jsonl after state.json was last written.

        `_audit` appends the entry, then records the new head in state.json; a process killed in
        between leaves entries the state does not know. Those that chain from the recorded head are
        adopted (with their decryption charge), and a torn last line after them is cut off, so the
        next entry chains on. Anything that does not chain is left for `hetrain audit verify` to report.
        """
        path = self.directory / AUDIT_FILE
        if not path.exists():
            return
        data = path.read_bytes()
        *complete, torn = data.split(b"\n")
        if len(complete) < self._seq:
            return
        adopted = 0
        for line in complete[self._seq :]:
            try:
                entry = json.loads(line)
            except ValueError:
                return
            if entry.get("seq") != self._seq + 1 or entry.get("prev") != self._last_hash:
                return
            self._seq, self._last_hash = self._seq + 1, hashlib.sha256(line).hexdigest()
            self.decryptions_used = max(self.decryptions_used, int(entry.get("decryptions_used", 0)))
            adopted += 1
        if torn:
            with open(path, "r+b") as fh:
                fh.truncate(len(data) - len(torn))
                os.fsync(fh.fileno())
        if adopted or torn:
            self._write_state()
