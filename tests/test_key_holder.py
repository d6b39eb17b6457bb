"""The key holder: policy refusals with their rule, budget, foreign keys, the hash-chained audit, persistence,
and the static check that no other library module can touch a secret key."""

import ast
import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from hetrain.mpc_ops.crypto import ckks, wire
from hetrain.core.config import PolicyConfig
from hetrain.core.errors import BudgetExhausted, BundleError, ForeignKeyError, PolicyRefusal, SecurityParameterError
from hetrain.core.params import CkksParams
from hetrain.core.shapes import LinearShape
from hetrain.mpc_ops.reveal.protocol import RevealRequest
from hetrain.mpc_ops.reveal.ledger import LEDGER_FILE
from hetrain.participants.key_holder import AUDIT_FILE, STATE_FILE, KeyHolder

pytestmark = pytest.mark.integration  # TenSEAL keys

REPO = Path(__file__).resolve().parent.parent
SLOTS = CkksParams().slots
VALUES = np.array([0.5, -1.25, 3.0, 7.75])  # what every test ciphertext holds in slots 0..3


def make_holder(directory: Path, *, shape=(64, 8), reveals=None, min_batch=32, budget=65536):
    """A key holder in its own directory, with the default CKKS parameters, and its loaded public context."""
    policy = PolicyConfig(
        cipher_layers=["enc1"], reveals=reveals if reveals is not None else {"enc1": {}},
        min_batch=min_batch, flooding={"budget": budget},
    )
    holder = KeyHolder.open_or_create(directory, CkksParams(), policy, {"enc1": LinearShape(*shape)})
    return holder, ckks.load_public_context(holder.public_context(), expected_key_id=holder.key_id)


@pytest.fixture
def keys(tmp_path):
    return make_holder(tmp_path / "key_holder")


def row_ids(n: int, start: int = 0) -> list[str]:
    """n sample pseudonyms, as the owners write them (hex)."""
    return [f"{i:024x}" for i in range(start, start + n)]


WEIGHTS = hashlib.sha256(b"weights-1").hexdigest()


def product_blob(public, values: np.ndarray) -> bytes:
    """A ciphertext of `values` after one ct × plain product, the level every revealed blob has."""
    fresh = ckks.load_vector(public, ckks.encrypt(public, values), ckks.fresh_layout(public))
    return ckks.multiply_plain(fresh, np.ones(SLOTS)).serialize()


def make_request(holder, public, *, kind="gradient", layer="enc1", aggregate=64, n_blobs=1, key_id=None,
                 rows=None, weights=WEIGHTS):
    """A reveal request of `n_blobs` real ciphertexts, each holding VALUES in slots 0..3, naming its rows:
    `aggregate` rows for a gradient, values / out_features rows for an activation."""
    slots = np.zeros(SLOTS)
    slots[: len(VALUES)] = VALUES
    blobs = [product_blob(public, slots) for _ in range(n_blobs)]
    if rows is None:
        h = holder.shapes[layer].out_features if layer in holder.shapes else 1
        rows = row_ids(aggregate if kind == "gradient" else max(1, len(VALUES) * n_blobs // h))
    return RevealRequest(
        request_id=uuid.uuid4().hex, key_id=key_id or holder.key_id, kind=kind, layer=layer, round=0,
        blobs=blobs, stride=[1] * n_blobs, counts=[len(VALUES)] * n_blobs, aggregate=aggregate,
        rows=rows, weights=weights,
    )


def audit_lines(holder) -> list[str]:
    return (holder.directory / AUDIT_FILE).read_text().splitlines()


def last_audit(holder) -> dict:
    return json.loads(audit_lines(holder)[-1])


def assert_refused_and_audited(holder, exc_info, rule: str, used_before: int):
    """The refusal carries its rule, the audit's last line records it, and no decryption was charged."""
    assert getattr(exc_info.value, "rule", type(exc_info.value).__name__) == rule
    entry = last_audit(holder)
    assert (entry["decision"], entry["rule"]) == ("refuse", rule)
    assert entry["message"] == str(exc_info.value)
    assert holder.decryptions_used == used_before


# ---- policy refusals -------------------------------------------------------------------------


def test_activation_reveal_of_an_invertible_layer_is_refused_and_audited(tmp_path):
    # Prepare: 4 inputs -> 8 outputs, so the activations would determine the inputs
    holder, public = make_holder(tmp_path / "kh", shape=(4, 8))
    request = make_request(holder, public, kind="activation", aggregate=4)

    # Execute
    with pytest.raises(PolicyRefusal, match=(
        r"^policy rule 'invertible_reveal' refused the reveal: layer 'enc1' has out_features=8 >= "
        r"in_features=4, .*set policy.reveals.enc1.allow_invertible: true to permit it$"
    )) as exc_info:
        holder.reveal(request)

    # Assert
    assert_refused_and_audited(holder, exc_info, "invertible_reveal", used_before=0)


def test_activation_reveal_of_an_invertible_layer_is_allowed_when_the_policy_permits_it(tmp_path):
    # Prepare
    holder, public = make_holder(tmp_path / "kh", shape=(4, 4), reveals={"enc1": {"allow_invertible": True}})
    request = make_request(holder, public, kind="activation", aggregate=4)

    # Execute
    response = holder.reveal(request)

    # Assert: values come back flooded (8σ bounds the noise; the CKKS error is far below 1e-6)
    np.testing.assert_allclose(response.values[0], VALUES, rtol=0, atol=8 * response.sigma + 1e-6)
    assert (response.decryptions_used, holder.decryptions_used) == (1, 1)
    entry = last_audit(holder)
    assert (entry["decision"], entry["slots_revealed"], entry["sigma"]) == ("allow", 4, response.sigma)


@pytest.mark.parametrize("kind, message", [
    ("activation", r"layer 'enc2' is not a declared reveal point \(allowed: \['enc1'\]\)"),
    ("gradient", r"layer 'enc2' is not a ciphertext layer \(allowed: \['enc1'\]\)"),
], ids=["activation", "gradient"])
def test_reveal_for_an_undeclared_layer_is_refused_and_audited(keys, kind, message):
    # Prepare
    holder, public = keys
    request = make_request(holder, public, kind=kind, layer="enc2")

    # Execute
    with pytest.raises(PolicyRefusal, match=r"^policy rule 'undeclared_reveal_point' refused the reveal: " + message):
        holder.reveal(request)

    # Assert
    entry = last_audit(holder)
    assert (entry["decision"], entry["rule"], entry["layer"]) == ("refuse", "undeclared_reveal_point", "enc2")
    assert holder.decryptions_used == 0


def test_gradient_aggregating_fewer_samples_than_min_batch_is_refused_and_audited(keys):
    # Prepare
    holder, public = keys
    request = make_request(holder, public, kind="gradient", aggregate=31)

    # Execute
    with pytest.raises(PolicyRefusal, match=(
        r"policy rule 'min_batch' refused the reveal: layer 'enc1': the gradient aggregates 31 samples, "
        r"fewer than policy.min_batch=32$"
    )) as exc_info:
        holder.reveal(request)

    # Assert
    assert_refused_and_audited(holder, exc_info, "min_batch", used_before=0)


def test_gradient_aggregating_exactly_min_batch_samples_is_allowed(keys):
    # Prepare
    holder, public = keys

    # Execute
    response = holder.reveal(make_request(holder, public, kind="gradient", aggregate=32))

    # Assert
    np.testing.assert_allclose(response.values[0], VALUES, rtol=0, atol=8 * response.sigma + 1e-6)
    assert last_audit(holder)["decision"] == "allow"


def test_reveal_of_an_unknown_kind_is_refused_and_audited(keys):
    # Prepare
    holder, public = keys
    request = make_request(holder, public, kind="weights")

    # Execute
    with pytest.raises(PolicyRefusal, match=(
        r"policy rule 'unknown_kind' refused the reveal: reveal kind must be 'activation', 'gradient' or 'metric', "
        r"got 'weights'"
    )) as exc_info:
        holder.reveal(request)

    # Assert
    assert_refused_and_audited(holder, exc_info, "unknown_kind", used_before=0)


def test_request_whose_strides_and_counts_do_not_match_its_blobs_is_refused_and_audited(keys):
    # Prepare
    holder, public = keys
    request = make_request(holder, public, n_blobs=2)
    request.counts = [4]

    # Execute
    with pytest.raises(BundleError, match=r"reveal request: 2 blobs but 2 strides and 1 counts") as exc_info:
        holder.reveal(request)

    # Assert
    assert_refused_and_audited(holder, exc_info, "BundleError", used_before=0)


FIELD_EDITS = {
    "stride overflow": ({"stride": [2**62]}, r"blob 0: stride 4611686018427387904 × count 4 does not fit 4096 slots"),
    "float count": ({"counts": [4.0]}, r"blob 0: stride 1 × count 4\.0 does not fit 4096 slots \(needs ints"),
    "blobs not a list": ({"blobs": "abc"}, r"'blobs', 'stride' and 'counts' must be lists, got str, list, list"),
    "blob not bytes": ({"blobs": [12345]}, r"blob 0: ciphertext blob: expected bytes, got int"),
    "no blobs": ({"blobs": [], "stride": [], "counts": []}, r"0 blobs but 0 strides and 0 counts \(allowed: equal lengths of 1\.\.4096\)"),
    "layer is a list": ({"layer": ["enc1"]}, r"'layer' must be a string of 1\.\.64 characters, got \['enc1'\]"),
    "kind is None": ({"kind": None}, r"'kind' must be a string of 1\.\.32 characters, got None"),
    "aggregate is a string": ({"aggregate": "64"}, r"'aggregate' must be an int in \[0, 2147483648\], got '64'"),
    "round is a bool": ({"round": True}, r"'round' must be an int in \[0, 1000000000\], got True"),
    "huge request id": ({"request_id": "x" * 10_000}, r"'request_id' must be a string of 1\.\.128 characters"),
}


@pytest.mark.parametrize("case", sorted(FIELD_EDITS))
def test_request_with_a_mistyped_or_out_of_range_field_is_refused_audited_and_not_charged(keys, case):
    # Prepare
    holder, public = keys
    request = make_request(holder, public)
    changes, message = FIELD_EDITS[case]
    for name, value in changes.items():
        setattr(request, name, value)

    # Execute
    with pytest.raises(BundleError, match=r"^reveal request: " + message) as exc_info:
        holder.reveal(request)

    # Assert: the refusal is in the audit log as valid JSON, nothing was charged
    assert_refused_and_audited(holder, exc_info, "BundleError", used_before=0)


def test_fresh_ciphertext_at_the_owner_level_is_refused_before_decryption(keys):
    # Prepare: a blob that skipped the ct × plain product still holds both data primes
    holder, public = keys
    request = make_request(holder, public)
    request.blobs = [ckks.encrypt(public, np.zeros(SLOTS))]

    # Execute
    with pytest.raises(BundleError, match=(
        r"reveal request: blob 0: ciphertext blob: the ciphertext is at a level with 2 coefficient moduli .*"
        r"layout 'product' needs 1"
    )) as exc_info:
        holder.reveal(request)

    # Assert
    assert_refused_and_audited(holder, exc_info, "BundleError", used_before=0)


# ---- budget and keys -------------------------------------------------------------------------


def test_request_beyond_the_decryption_budget_is_refused_and_asks_for_rotation(tmp_path):
    # Prepare: a budget of 3 decryptions, 2 of them spent
    holder, public = make_holder(tmp_path / "kh", budget=3)
    holder.reveal(make_request(holder, public, n_blobs=2))

    # Execute
    with pytest.raises(BudgetExhausted, match=(
        r"policy rule 'decryption_budget' refused the reveal: 2 of the budget of 3 decryptions are used and "
        r"this request needs 2; rotate the key with `hetrain rotate-key RUN_DIR`, then resume"
    )) as exc_info:
        holder.reveal(make_request(holder, public, n_blobs=2))

    # Assert: a budget refusal is a policy refusal, and nothing more was charged
    assert isinstance(exc_info.value, PolicyRefusal)
    assert_refused_and_audited(holder, exc_info, "decryption_budget", used_before=2)


def test_request_naming_another_key_id_is_refused_as_foreign_and_audited(keys):
    # Prepare
    holder, public = keys
    request = make_request(holder, public, key_id="k-" + "0" * 32)

    # Execute
    with pytest.raises(ForeignKeyError, match=(
        rf"reveal request names key id k-{'0' * 32}; this key holder's is {holder.key_id}$"
    )) as exc_info:
        holder.reveal(request)

    # Assert
    assert_refused_and_audited(holder, exc_info, "ForeignKeyError", used_before=0)


def test_ciphertext_under_another_holders_key_is_refused_instead_of_decrypted_to_garbage(tmp_path):
    # Prepare: the right key id on the request, but the ciphertext comes from another key holder's context
    holder, _ = make_holder(tmp_path / "ours")
    other, other_public = make_holder(tmp_path / "theirs")
    request = make_request(other, other_public, key_id=holder.key_id)

    # Execute
    with pytest.raises(ForeignKeyError, match=(
        r"^a flooded decrypted value is beyond the headroom of 512: the ciphertext was made under another key "
        r"or overflowed its scale$"
    )) as exc_info:
        holder.reveal(request)

    # Assert: audited as a refusal; the decryption was attempted, so it is charged
    assert_refused_and_audited(holder, exc_info, "ForeignKeyError", used_before=1)
    assert other.decryptions_used == 0


def request_holding(holder, public, first: float) -> RevealRequest:
    """A gradient request whose ciphertext holds `first` in slot 0 and VALUES[1:] in slots 1..3."""
    request = make_request(holder, public)
    slots = np.zeros(SLOTS)
    slots[: len(VALUES)] = [first, *VALUES[1:]]
    request.blobs = [product_blob(public, slots)]
    return request


@pytest.mark.parametrize("first, shift, refused", [(600.0, -200.0, False), (400.0, 200.0, True)])
def test_headroom_check_sees_only_flooded_values(keys, monkeypatch, first, shift, refused):
    # Prepare: flooding that shifts every value by `shift`, so the raw and flooded values fall on
    # opposite sides of the headroom of 512
    holder, public = keys
    from hetrain.participants import key_holder as kh_module
    monkeypatch.setattr(kh_module.flooding, "flood", lambda v, sigma: v + shift)
    request = request_holding(holder, public, first)

    # Execute / Assert: the decision follows the flooded value, and a refusal names no value
    if refused:
        with pytest.raises(ForeignKeyError, match=r"^a flooded decrypted value is beyond the headroom of 512: ") as exc:
            holder.reveal(request)
        assert "400" not in str(exc.value) and "600" not in str(exc.value)
        assert_refused_and_audited(holder, exc, "ForeignKeyError", used_before=1)
    else:
        response = holder.reveal(request)
        assert response.values[0][0] == pytest.approx(first + shift, abs=1e-3)


def test_ciphertext_with_a_corrupt_seal_payload_is_refused_audited_and_its_charge_persisted(keys):
    # Prepare: valid wire structure and SEAL header, scrambled polynomial data in the second blob
    holder, public = keys
    request = make_request(holder, public, n_blobs=2)
    parts = wire.parse(request.blobs[1], max_slots=SLOTS)
    seal = bytearray(parts.seal_ciphertext)
    seal[100:200] = bytes(b ^ 0xFF for b in seal[100:200])
    request.blobs[1] = wire.build(wire.VectorBlob(parts.size, bytes(seal), parts.scale))

    # Execute
    with pytest.raises(BundleError):
        holder.reveal(request)

    # Assert
    assert last_audit(holder)["decision"] == "refuse"
    state = json.loads((holder.directory / STATE_FILE).read_text())
    assert state["decryptions_used"] == holder.decryptions_used


# ---- audit chain and persistence -------------------------------------------------------------


def test_audit_entries_are_hash_chained_across_allows_refusals_and_a_reopen(tmp_path):
    # Prepare
    directory = tmp_path / "kh"
    holder, public = make_holder(directory)
    holder.reveal(make_request(holder, public))
    with pytest.raises(PolicyRefusal):
        holder.reveal(make_request(holder, public, aggregate=2))
    holder, public = make_holder(directory)

    # Execute
    holder.reveal(make_request(holder, public))
    lines = audit_lines(holder)

    # Assert: entry k's 'prev' is the SHA-256 of line k-1's text; the state's head is the last line's hash
    entries = [json.loads(line) for line in lines]
    assert [e["decision"] for e in entries] == ["allow", "refuse", "allow"]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == "0" * 64
    for previous, entry in zip(lines, entries[1:]):
        assert entry["prev"] == hashlib.sha256(previous.encode()).hexdigest()
    state = json.loads((directory / STATE_FILE).read_text())
    assert state["audit_head"] == hashlib.sha256(lines[-1].encode()).hexdigest()


def test_audit_log_is_created_owner_only_and_an_older_world_readable_one_is_tightened(tmp_path):
    # Prepare: one holder writes a fresh log; a second directory holds a log an older version made 0644
    holder, public = make_holder(tmp_path / "fresh")
    old, old_public = make_holder(tmp_path / "old")
    (old.directory / AUDIT_FILE).touch(mode=0o644)
    (old.directory / AUDIT_FILE).chmod(0o644)

    # Execute
    holder.reveal(make_request(holder, public))
    old.reveal(make_request(old, old_public))

    # Assert
    for kh in (holder, old):
        assert (kh.directory / AUDIT_FILE).stat().st_mode & 0o777 == 0o600
        assert (kh.directory / LEDGER_FILE).stat().st_mode & 0o777 == 0o600


def test_reopening_the_directory_keeps_the_key_and_the_decryptions_used(tmp_path):
    # Prepare
    directory = tmp_path / "kh"
    holder, public = make_holder(directory)
    holder.reveal(make_request(holder, public, n_blobs=2))
    holder.reveal(make_request(holder, public, n_blobs=1))

    # Execute
    reopened, reopened_public = make_holder(directory)

    # Assert: same key (an old ciphertext still decrypts), same count
    assert reopened.key_id == holder.key_id
    assert reopened.decryptions_used == 3
    response = reopened.reveal(make_request(holder, public))
    np.testing.assert_allclose(response.values[0], VALUES, rtol=0, atol=8 * response.sigma + 1e-6)
    assert response.decryptions_used == 4
    assert ckks.key_id(reopened_public) == holder.key_id


def test_entry_appended_but_not_recorded_before_a_crash_is_adopted_and_the_chain_still_verifies(tmp_path):
    # Prepare: a process killed between the audit append and the state.json write (what the
    # failpoint keyholder.after_audit_append does in `hetrain bench --faults`)
    from hetrain.participants.audit import verify

    directory = tmp_path / "kh"
    holder, public = make_holder(directory)
    holder.reveal(make_request(holder, public))
    state_before = (directory / STATE_FILE).read_bytes()
    holder.reveal(make_request(holder, public, n_blobs=2))
    (directory / STATE_FILE).write_bytes(state_before)  # the state write never happened

    # Execute
    reopened, _ = make_holder(directory)
    reopened.reveal(make_request(holder, public))

    # Assert: nothing dropped, every entry chained once, the unrecorded charge still counted
    entries = [json.loads(line) for line in audit_lines(reopened)]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert reopened.decryptions_used == 4 and entries[-1]["decryptions_used"] == 4
    assert verify(directory).entries == 3


def test_torn_last_audit_line_is_cut_off_on_reopen_and_the_next_entry_chains_on(tmp_path):
    # Prepare: a half-written line after the recorded head (a write cut short)
    from hetrain.participants.audit import verify

    directory = tmp_path / "kh"
    holder, public = make_holder(directory)
    holder.reveal(make_request(holder, public))
    with open(directory / AUDIT_FILE, "a") as fh:
        fh.write('{"aggregate": 64, "budg')

    # Execute
    reopened, _ = make_holder(directory)
    reopened.reveal(make_request(holder, public))

    # Assert
    assert [json.loads(line)["seq"] for line in audit_lines(reopened)] == [1, 2]
    assert verify(directory).entries == 2


def test_key_creation_interrupted_after_its_first_file_leaves_a_directory_that_reopens(tmp_path, monkeypatch):
    # Prepare: the second of the two files a new key writes fails (a crash or a full disk there)
    from hetrain.core import store

    directory, real, calls = tmp_path / "kh", store.write_bytes, []

    def second_write_fails(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "write_bytes", second_write_fails)
    with pytest.raises(OSError):
        make_holder(directory)
    monkeypatch.undo()

    # Execute
    reopened, public = make_holder(directory)

    # Assert: a usable key, recorded in the state, instead of a refusal to open
    assert json.loads((directory / STATE_FILE).read_text())["key_id"] == reopened.key_id
    assert reopened.reveal(make_request(reopened, public)).decryptions_used == 1


def test_open_or_create_refuses_parameters_over_the_128_bit_bound_and_writes_nothing(tmp_path):
    # Prepare
    directory = tmp_path / "kh"
    policy = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}})
    params = CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60, 60, 60), scale_bits=50)

    # Execute
    with pytest.raises(SecurityParameterError, match=(
        r"ckks.coeff_mod_bit_sizes \[60, 60, 60, 60\] total 240 bits, over the 128-bit security bound of "
        r"218 bits for poly_modulus_degree=8192"
    )):
        KeyHolder.open_or_create(directory, params, policy, {"enc1": LinearShape(64, 8)})

    # Assert
    assert not directory.exists()


# ---- public material -------------------------------------------------------------------------


def test_public_context_carries_no_secret_key(ckks_keys):
    # Prepare
    holder, public = ckks_keys

    # Execute
    reloaded = ts.context_from(holder.public_context())

    # Assert
    assert not public.is_private()
    assert not reloaded.is_private()
    assert ckks.key_id(reloaded) == holder.key_id


def test_load_public_context_refuses_a_private_context():
    # Prepare
    private = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 50, 60])
    data = private.serialize(save_secret_key=True)

    # Execute / Assert
    with pytest.raises(BundleError, match=r"public context: it carries a secret key; only the key holder"):
        ckks.load_public_context(data)


def test_load_public_context_refuses_junk_and_a_context_of_another_key(ckks_keys, tmp_path):
    # Prepare
    holder, _ = ckks_keys
    other, _ = make_holder(tmp_path / "other")

    # Execute / Assert
    with pytest.raises(BundleError, match=r"public context: cannot be parsed"):
        ckks.load_public_context(b"not a context at all")
    with pytest.raises(ForeignKeyError, match=rf"public context has key id {other.key_id}, expected {holder.key_id}"):
        ckks.load_public_context(other.public_context(), expected_key_id=holder.key_id)


# ---- static containment ----------------------------------------------------------------------

LIBRARY_DIRS = ("mpc_ops", "participants", "flows", "bench")
KEY_HOLDER = "participants/key_holder.py"
# Benchmark code that owns its own throwaway keys and is not a hetrain role: the TenSEAL
# Tutorial-1 baseline (its layout decrypts and re-encrypts weights every epoch) and the
# microbenchmark that times decryption for the cost model. Neither ever sees a run's keys.
EXEMPT = {"bench/tutorial_lr.py", "bench/microbench.py"}


def secret_key_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every call that decrypts, makes a private context or exports a secret key."""
    tree = ast.parse(source)
    tenseal_names = {"tenseal"} | {
        alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names if alias.name == "tenseal"
    }
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "tenseal":
            hits += [(node.lineno, f"from tenseal import {a.name}") for a in node.names
                     if a.name in ("context", "secret_key", "*")]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "decrypt":
            hits.append((node.lineno, ".decrypt("))
        if name == "secret_key":
            hits.append((node.lineno, "secret_key("))
        if (name == "context" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and func.value.id in tenseal_names):
            hits.append((node.lineno, f"{func.value.id}.context("))
        for kw in node.keywords:
            if kw.arg == "save_secret_key" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                hits.append((node.lineno, "save_secret_key=" + ast.unparse(kw.value)))
    return hits


def test_containment_scanner_finds_the_key_holders_own_secret_key_uses():
    # Execute
    found = {what for _, what in secret_key_uses((REPO / KEY_HOLDER).read_text())}

    # Assert: the scanner is not vacuous; it sees every kind of use the key holder is allowed
    assert {".decrypt(", "ts.context(", "save_secret_key=True"} <= found


@pytest.mark.parametrize("snippet, what", [
    ("v.decrypt()", ".decrypt("),
    ("import tenseal as T\nT.context(T.SCHEME_TYPE.CKKS, 8192)", "T.context("),
    ("ctx.secret_key()", "secret_key("),
    ("ctx.serialize(save_secret_key=flag)", "save_secret_key=flag"),
    ("from tenseal import context", "from tenseal import context"),
])
def test_containment_scanner_flags_each_forbidden_pattern(snippet, what):
    assert [w for _, w in secret_key_uses(snippet)] == [what]


def test_only_the_key_holder_module_decrypts_or_touches_a_secret_key():
    # Prepare
    files = sorted(p for d in LIBRARY_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))
    assert any(p.relative_to(REPO).as_posix() == KEY_HOLDER for p in files)

    # Execute
    offending = [
        f"{path.relative_to(REPO).as_posix()}:{line}: {what}"
        for path in files if path.relative_to(REPO).as_posix() not in {KEY_HOLDER} | EXEMPT
        for line, what in secret_key_uses(path.read_text())
    ]

    # Assert
    assert not offending, "secret-key use outside participants/key_holder.py:\n" + "\n".join(offending)
