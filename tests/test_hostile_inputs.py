"""Property: every loader either accepts a mutated input as valid, and then it decodes to the right
numbers when the mutation was a no-op, or raises a HetrainError subclass; never another exception,
a hang or a dead process.

Ciphertexts are mutated at the byte level (bit flips, truncation, extension, random bytes) and at
the field level (the protobuf's size and scale, SEAL's degree, number of moduli, polynomials, scale,
NTT flag, coefficient count). They are loaded by a long-lived worker process (bench/hostile_worker.py),
so even a crash inside TenSEAL would fail the example that caused it rather than kill the test run.
"""

import json
import multiprocessing
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetrain.bench.harness import hostile_cases as hc
from hetrain.bench.harness import hostile_mutate as mutate
from hetrain.bench.harness.hostile_setup import OWNER, REVEALED, build_setup
from hetrain.bench.harness.hostile_worker import serve
from hetrain.mpc_ops.crypto import ckks
from hetrain.core import store
from hetrain.mpc_ops.exchange.bundle import BatchRef, ExchangeStore
from hetrain.configure import load_config
from hetrain.core.errors import HetrainError
from hetrain.participants import audit

pytestmark = pytest.mark.integration  # TenSEAL keys, loader worker processes

# The unit suite runs 60 fixed examples per loader; HETRAIN_FUZZ_EXAMPLES=2000 runs a longer, random campaign.
CAMPAIGN = os.environ.get("HETRAIN_FUZZ_EXAMPLES")
SETTINGS = settings(max_examples=int(CAMPAIGN or 60), deadline=None, derandomize=CAMPAIGN is None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=max(8, int(CAMPAIGN or 0) // 8))  # each spawns the isolated loader (~0.4 s)
TOLERANCE = 1e-3  # flooding σ ≈ 1e-5 with security_bits 0; the CKKS error is far smaller


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def worker(setup, tmp_path_factory):
    """call(kind, blob, changes) -> result dict from the loader worker; fails the test if it dies."""
    context = multiprocessing.get_context("forkserver")
    parent, child = context.Pipe()
    process = context.Process(target=serve, args=(str(Path(setup.root) / "setup.json"),
                                                  str(tmp_path_factory.mktemp("worker")), child), daemon=True)
    process.start()

    def call(kind: str, blob, changes: dict | None = None) -> dict:
        parent.send((kind, blob, changes or {}))
        if not parent.poll(120):
            process.kill()
            pytest.fail(f"the loader worker hung on a {kind} job")
        try:
            return parent.recv()
        except EOFError:
            process.join()
            pytest.fail(f"the loader worker died (exit code {process.exitcode}) on a {kind} job")

    yield call
    parent.send(None)
    process.join(10)


@pytest.fixture(scope="module")
def originals(setup):
    """The genuine product blob, a genuine fresh blob of the same values, and those values."""
    values = np.load(setup.values)
    public = ckks.load_public_context(setup.paths.public_context.read_bytes())
    return {"product": Path(setup.product).read_bytes(), "fresh": ckks.encrypt(public, values),
            "expected": values[:REVEALED], "all_values": values}


def assert_accepted_right_or_rejected(result: dict, expected: np.ndarray, no_op: bool) -> None:
    assert result["outcome"] in ("accepted", "rejected"), f"{result['error']}: {result['message']}"
    if result["outcome"] == "rejected":
        assert not no_op, f"an unchanged input was refused: {result['message']}"
        assert result["message"]
        return
    got = np.asarray(result["values"][0])
    right = got.shape == expected.shape and np.allclose(got, expected, atol=TOLERANCE)
    assert right or not no_op, "an unchanged input decoded to other numbers"
    assert right, f"a changed input was accepted and decoded to {result['values'][0][:3]}…, not {expected[:3]}…"


# ---- ciphertext mutations ---------------------------------------------------------------------

def _field_values(field: str):
    if field in ("seal_scale", "scale"):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([2.0**50, 2.0**49]))
    if field == "ntt":
        return st.integers(0, 255)
    if field == "size":
        return st.integers(0, 2**40)
    return st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 3, 4096, 8192, 16384]))


blob_mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.integers(0, 2**21), min_size=0, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 300_000)),
    st.tuples(st.just("extend"), st.binary(min_size=0, max_size=64)),
    st.tuples(st.just("random"), st.binary(min_size=0, max_size=512)),
    st.sampled_from(mutate.FIELDS).flatmap(lambda f: st.tuples(st.just("field"), st.just(f), _field_values(f))),
)


def apply(blob: bytes, mutation) -> bytes:
    kind, *args = mutation
    if kind == "flip":
        return mutate.flip(blob, args[0]) if args[0] else blob
    if kind == "truncate":
        return blob[: args[0]]
    if kind == "extend":
        return blob + args[0]
    if kind == "random":
        return args[0]
    return mutate.set_field(blob, *args)


@SETTINGS
@given(mutation=blob_mutation)
def test_key_holder_refuses_or_correctly_decrypts_a_mutated_reveal_blob(worker, originals, mutation):
    # Prepare
    original = originals["product"]
    blob = apply(original, mutation)

    # Execute
    result = worker("reveal", blob)

    # Assert
    assert_accepted_right_or_rejected(result, originals["expected"], no_op=blob == original)


@SETTINGS
@given(mutation=blob_mutation)
def test_trainer_refuses_or_correctly_loads_a_mutated_owner_blob(worker, originals, mutation):
    # Prepare
    original = originals["fresh"]
    blob = apply(original, mutation)

    # Execute
    result = worker("fresh", blob)

    # Assert
    assert_accepted_right_or_rejected(result, originals["expected"], no_op=blob == original)


request_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=80),
                           st.binary(max_size=40), st.lists(st.integers(-5, 5000), max_size=3))


@SETTINGS
@given(field=st.sampled_from(["request_id", "key_id", "kind", "layer", "round", "aggregate", "stride", "counts",
                              "blobs"]), value=request_values)
def test_key_holder_refuses_or_correctly_answers_a_request_with_any_field_value(worker, originals, field, value):
    # Prepare: a value that happens to be valid (say round=3, or stride [2]) must give the slots it names
    fields = {"stride": [1], "counts": [REVEALED], field: value}
    try:
        (stride,), (count,) = fields["stride"], fields["counts"]
        expected = originals["all_values"][: int(stride) * (int(count) - 1) + 1 : int(stride)]
    except (TypeError, ValueError):
        expected = originals["expected"]  # an unusable stride or count: only a refusal is right

    # Execute
    result = worker("reveal", originals["product"], {field: value})

    # Assert
    assert_accepted_right_or_rejected(result, expected, no_op=False)


# ---- files: manifests, label files, contexts, checkpoints, configs, audit logs -----------------

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(allow_nan=False),
                                     st.text(max_size=20)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)


def _paths(node, prefix=()):
    """Every (path) to a value inside a JSON document."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


def _replace(doc, path, value):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def expect_ok_or_hetrain(run) -> bool:
    """True if accepted, False if refused with a HetrainError; any other exception fails the example."""
    try:
        run()
    except HetrainError as exc:
        assert str(exc)
        return False
    return True


@SETTINGS
@given(data=st.data())
def test_exchange_store_refuses_or_accepts_a_manifest_with_any_node_replaced(setup, tmp_path_factory, data):
    # Prepare
    paths = hc.scratch_run(setup, tmp_path_factory.mktemp("manifest"))
    path = paths.exchange / OWNER / "manifest.json"
    manifest = json.loads(path.read_text())
    where = data.draw(st.sampled_from(list(_paths(manifest))))
    path.write_text(json.dumps(_replace(manifest, where, data.draw(json_values))))
    cfg = setup.cfg()

    def read_everything():
        exchange = ExchangeStore(paths.exchange, cfg, json.loads((Path(setup.run) / "exchange" / OWNER /
                                                                   "manifest.json").read_text())["key_id"],
                                 hc.packing_plan(cfg))
        for split in ("train", "test"):
            for ref in exchange.batches(split):
                exchange.load(ref)
                assert exchange.labels(ref).dtype == np.int64

    # Execute / Assert
    expect_ok_or_hetrain(read_everything)
    shutil.rmtree(paths.root)


@SETTINGS
@given(edit=st.one_of(st.tuples(st.just("flip"), st.lists(st.integers(0, 8 * 2000), min_size=1, max_size=8)),
                      st.tuples(st.just("truncate"), st.integers(0, 2000)),
                      st.tuples(st.just("random"), st.binary(max_size=300))))
def test_label_reader_refuses_or_accepts_any_label_file_its_owner_vouches_for(setup, tmp_path_factory, edit):
    # Prepare: a hostile label owner fixes the digest, so only the reader's own checks stand
    paths = hc.scratch_run(setup, tmp_path_factory.mktemp("labels"))
    path = paths.exchange / OWNER / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["labels"]["train"]
    label_path = paths.exchange / OWNER / entry["file"]
    data = apply(label_path.read_bytes(), edit)
    label_path.write_bytes(data)
    entry.update(sha256=store.sha256_bytes(data), bytes=max(1, len(data)))
    path.write_text(json.dumps(manifest))
    cfg = setup.cfg()

    def read_labels():
        exchange = ExchangeStore(paths.exchange, cfg, manifest["key_id"], hc.packing_plan(cfg))
        labels = exchange.labels(BatchRef("train", (OWNER,), 0))
        assert labels.dtype == np.int64 and set(np.unique(labels)) <= {0, 1}

    # Execute / Assert
    expect_ok_or_hetrain(read_labels)
    shutil.rmtree(paths.root)


@FEW
@given(edit=st.one_of(st.tuples(st.just("flip"), st.lists(st.integers(0, 8 * 4000), min_size=1, max_size=4)),
                      st.tuples(st.just("truncate"), st.integers(0, 20_000_000)),
                      st.tuples(st.just("random"), st.binary(max_size=2000))))
def test_public_context_loader_refuses_or_accepts_a_mutated_context(setup, edit):
    # Prepare
    original = setup.paths.public_context.read_bytes()
    data = apply(original, edit)

    # Execute / Assert: flips deep inside the Galois keys may load; nothing may crash
    accepted = expect_ok_or_hetrain(lambda: ckks.load_public_context(data, params=setup.cfg().ckks.params()))
    assert accepted or data != original


def _npz_flip(bits):
    return lambda directory: (directory / "params.npz").write_bytes(
        mutate.flip((directory / "params.npz").read_bytes(), bits))


def _state_edit(doc_edit):
    def edit(directory: Path) -> None:
        state = json.loads((directory / "state.json").read_text())
        (directory / "state.json").write_text(json.dumps(doc_edit(state)))
    return edit


def _forged_npz(members: dict[str, bytes]):
    def edit(directory: Path) -> None:
        with zipfile.ZipFile(directory / "params.npz", "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        state = json.loads((directory / "state.json").read_text())
        state["sha256"]["params.npz"] = store.sha256_file(directory / "params.npz")
        (directory / "state.json").write_text(json.dumps(state))
    return edit


@SETTINGS
@given(data=st.data())
def test_checkpoint_reader_refuses_or_accepts_any_edit_of_a_round(setup, tmp_path_factory, data):
    # Prepare
    state = json.loads((setup.paths.checkpoints / "round-00001" / "state.json").read_text())
    choice = data.draw(st.sampled_from(["state", "npz_bits", "npz_member"]))
    if choice == "state":
        where = data.draw(st.sampled_from(list(_paths(state))))
        value = data.draw(json_values)
        edit = _state_edit(lambda s: _replace(s, where, value))
    elif choice == "npz_bits":
        edit = _npz_flip(data.draw(st.lists(st.integers(0, 8 * 2000), min_size=1, max_size=4)))
    else:
        names = st.characters(exclude_categories=["Cs"], exclude_characters="\x00/")  # what zipfile can write
        name = data.draw(st.text(names, max_size=12))
        edit = _forged_npz({name + ".npy": data.draw(st.binary(max_size=200))})

    # Execute / Assert
    expect_ok_or_hetrain(lambda: hc.checkpoint_copy(setup, tmp_path_factory.mktemp("ckpt"), edit))


@SETTINGS
@given(data=st.data())
def test_config_reader_refuses_or_accepts_any_edit_of_the_yaml(setup, tmp_path, data):
    # Prepare
    text = Path(setup.config).read_bytes()
    choice = data.draw(st.sampled_from(["bytes", "insert"]))
    if choice == "bytes":
        bad = apply(text, data.draw(st.tuples(st.just("flip"), st.lists(st.integers(0, 8 * len(text)), max_size=6))))
    else:
        at = data.draw(st.integers(0, len(text)))
        bad = text[:at] + data.draw(st.text(alphabet="[]{}:&*!|>-#,'\"\n ab1", max_size=30)).encode() + text[at:]
    path = tmp_path / "config.yaml"
    path.write_bytes(bad)

    # Execute / Assert
    expect_ok_or_hetrain(lambda: load_config(path))


@SETTINGS
@given(bits=st.lists(st.integers(0, 8 * 4000), min_size=1, max_size=4))
def test_audit_verify_refuses_every_changed_log(setup, tmp_path_factory, bits):
    # Prepare
    directory = tmp_path_factory.mktemp("audit") / "key_holder"
    shutil.copytree(setup.paths.key_holder, directory)
    log = directory / "audit.jsonl"
    original = log.read_bytes()
    log.write_bytes(mutate.flip(original, bits))

    # Execute
    accepted = expect_ok_or_hetrain(lambda: audit.verify(directory))

    # Assert: the log is hash-chained, so any real change is caught
    assert accepted == (log.read_bytes() == original)


def test_field_offsets_match_a_real_blob(originals):
    # The mutators edit SEAL fields by offset; check the offsets on a real blob so a mutation is never vacuous
    blob = originals["product"]
    assert [mutate.field_value(blob, f) for f in ("ntt", "polys", "degree", "moduli", "seal_scale", "correction",
                                                  "coefficient_count", "size", "scale")] == \
        [1, 2, 8192, 1, 2.0**50, 1, 2 * 8192, 4096, 2.0**50]
    assert struct.calcsize("<4QB3QdQ") == 73
