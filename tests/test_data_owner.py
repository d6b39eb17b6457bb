"""Tests for hetrain.participants.data_owner.prepare and the trainer's ExchangeStore reading its bundles."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hetrain.runtime import packing_plan
from hetrain.core import store
from hetrain.mpc_ops.exchange.bundle import BatchRef, ExchangeStore
from hetrain.mpc_ops.layers.cipher_layers import CipherLinear, PlainInputLinear
from hetrain.configure import parse_config
from hetrain.core.config import PolicyConfig
from hetrain.core.errors import AlignmentError, BundleError, DigestMismatch, ForeignKeyError, SchemaError
from hetrain.mpc_ops.layers.packing import PackingPlan
from hetrain.core.params import CkksParams
from hetrain.core.shapes import LinearShape
from hetrain.mpc_ops.reveal.protocol import blind, unblind
from hetrain.mpc_ops.crypto.tensors import EncryptedBatch, PlainBatch
from hetrain.participants import pseudonyms
from hetrain.participants.data_owner import MANIFEST, prepare
from hetrain.participants.key_holder import KeyHolder
from hetrain.participants.table import split_ids

REPO = Path(__file__).resolve().parent.parent


# ---- helpers -------------------------------------------------------------------------------
def build_config(name: str, paths: dict[str, Path], *, batch_size: int | None = None,
                 min_batch: int | None = None):
    """The shipped config `name`, keeping only the owners in `paths`, each pointed at its test table."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    raw["data"]["owners"] = [{**o, "path": str(paths[o["name"]])}
                             for o in raw["data"]["owners"] if o["name"] in paths]
    if batch_size is not None:
        raw["train"]["batch_size"] = batch_size
    if min_batch is not None:
        raw["policy"]["min_batch"] = min_batch
    return parse_config(raw, f"{name} (test copy)")


def owner_of(cfg, name: str):
    return next(o for o in cfg.data.owners if o.name == name)


def id_key(cfg) -> bytes:
    """The owners' shared pseudonym key (made beside the first table on the first prepare)."""
    return pseudonyms.owner_key(cfg, cfg.data.owners[0])


def prepare_owners(cfg, holder, exchange: Path, twin_dir: Path | None = None,
                   only: tuple[str, ...] | None = None) -> dict[str, dict]:
    plan = packing_plan(cfg)
    return {o.name: prepare(cfg, o, holder.public_context(), plan, exchange, twin_dir)
            for o in cfg.data.owners if only is None or o.name in only}


def open_store(cfg, holder, exchange: Path) -> ExchangeStore:
    return ExchangeStore(exchange, cfg, holder.key_id, packing_plan(cfg))


def manifest_entries(manifest: dict) -> list[dict]:
    """Every blob entry a manifest names: IDs, ciphertexts (both layouts) and labels."""
    entries = []
    for split in manifest["splits"].values():
        entries.append(split["ids"])
        for batch in split["batches"]:
            entries += batch["rows"] + batch["cols"]
    entries += list((manifest["labels"] or {}).values())
    return entries


def file_state(folder: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, store.sha256_file(p))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_csv_text(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def write_csv_text(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def expected_standardised(csv: Path, features: list[str], train_hashes: list[str], key: bytes,
                          clip: float = 4.0) -> np.ndarray:
    """Train rows of the CSV in published-ID order, standardised on train statistics and clipped."""
    frame = pd.read_csv(csv, dtype={"id": str})
    by_hash = dict(zip(pseudonyms.pseudonyms(frame["id"].to_numpy(), key), range(len(frame))))
    x = frame[features].to_numpy(np.float64)[[by_hash[h] for h in train_hashes]]
    return np.clip((x - x.mean(axis=0)) / x.std(axis=0), -clip, clip)


def revealed_forward(holder, context, plan: PackingPlan, batch: EncryptedBatch, weight: np.ndarray):
    """X·W computed on ciphertext, then revealed through the key holder (blinded, flooded).

    Returns the values and the tolerance they carry: 8σ of the key holder's flooding noise,
    divided by the smallest plaintext gain (P(|z| > 8σ) ≈ 1e-15 per value), plus 1e-6 for CKKS.
    """
    enc = CipherLinear("enc1", weight, context, plan).forward(batch)
    request, masks = blind(enc, context, key_id=holder.key_id, round_no=0, mask_bound=64.0)
    response = holder.reveal(request)
    return unblind(enc, response, masks), 8 * response.sigma / min(enc.gains) + 1e-6


# ---- shared bundles (encrypted once per module) ---------------------------------------------
@pytest.fixture(scope="module")
def clinic_bundle(demo_data, ckks_keys, tmp_path_factory):
    """clinic_a's breast-cancer bundle, with its plaintext twin file."""
    holder, _ = ckks_keys
    root = tmp_path_factory.mktemp("clinic")
    csv = demo_data / "breast_cancer" / "clinic_a.csv"
    cfg = build_config("breast_cancer", {"clinic_a": csv})
    csv_before = store.sha256_file(csv)
    manifest = prepare_owners(cfg, holder, root / "exchange", root / "owners")["clinic_a"]
    return {"cfg": cfg, "csv": csv, "csv_sha256_before": csv_before, "exchange": root / "exchange",
            "twin_dir": root / "owners", "manifest": manifest}


@pytest.fixture
def clinic_copy(clinic_bundle, tmp_path) -> Path:
    """A private copy of clinic_a's exchange folder, for tests that tamper with it."""
    exchange = tmp_path / "exchange"
    shutil.copytree(clinic_bundle["exchange"], exchange)
    return exchange


@pytest.fixture(scope="module")
def digits_tables(demo_data, tmp_path_factory) -> dict[str, Path]:
    """The first 300 digits samples as each owner holds them (each file keeps its own row order)."""
    keep = {f"dg-{i:04d}" for i in range(1, 301)}
    out = tmp_path_factory.mktemp("digits")
    tables = {}
    for owner, name in (("bank", "bank_pixels.csv"), ("telco", "telco_pixels.csv")):
        frame = read_csv_text(demo_data / "digits" / name)
        tables[owner] = write_csv_text(frame[frame["id"].isin(keep)], out / name)
    return tables


@pytest.fixture(scope="module")
def digits_bundle(digits_tables, ckks_keys, tmp_path_factory):
    holder, _ = ckks_keys
    root = tmp_path_factory.mktemp("digits_run")
    cfg = build_config("digits_vertical", digits_tables)
    manifests = prepare_owners(cfg, holder, root / "exchange", root / "owners")
    return {"cfg": cfg, "exchange": root / "exchange", "twin_dir": root / "owners", "manifests": manifests}


# ---- prepare(): what the bundle holds ---------------------------------------------------------
def test_prepare_writes_manifest_with_key_id_layout_and_digests_matching_every_blob(clinic_bundle, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    cfg, manifest = clinic_bundle["cfg"], clinic_bundle["manifest"]
    plan = packing_plan(cfg)
    out = clinic_bundle["exchange"] / "clinic_a"
    # Execute
    on_disk = json.loads((out / MANIFEST).read_text())
    # Assert
    assert on_disk == manifest
    assert manifest["key_id"] == holder.key_id and manifest["owner"] == "clinic_a"
    assert manifest["layout"] == {"slots": plan.slots, "seg": plan.seg, "samples_per_ct": plan.samples_per_ct,
                                  "forward": plan.forward}
    assert manifest["data_sha256"] == store.sha256_file(clinic_bundle["csv"])
    assert manifest["reused"] is False
    for entry in manifest_entries(manifest):
        data = (out / entry["file"]).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry["sha256"], entry["bytes"]), entry["file"]
    named = {e["file"] for e in manifest_entries(manifest)} | {MANIFEST}
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == named  # no stray temp files


def test_prepare_encrypts_train_in_rows_and_cols_and_test_in_rows_only(clinic_bundle):
    # Prepare
    manifest = clinic_bundle["manifest"]
    plan = packing_plan(clinic_bundle["cfg"])
    train, test = manifest["splits"]["train"], manifest["splits"]["test"]
    # Execute
    train_sizes = [b["n"] for b in train["batches"]]
    test_sizes = [b["n"] for b in test["batches"]]
    # Assert
    assert (train["n"], test["n"]) == (232, 52)  # clinic_a's 284 rows under seed 7, test_fraction 0.2
    assert train_sizes == [64, 64, 64, 40] and test_sizes == [52]
    for batch in train["batches"]:
        assert len(batch["rows"]) == len(batch["cols"]) == len(plan.chunks(batch["n"]))
        assert all(e["file"].endswith(".rows.ct") for e in batch["rows"])
        assert all(e["file"].endswith(".cols.ct") for e in batch["cols"])
    for batch in test["batches"]:
        assert len(batch["rows"]) == len(plan.chunks(batch["n"])) and batch["cols"] == []
    generation = train["ids"]["file"].split("/")[0]
    assert generation.startswith("g-")
    assert manifest["labels"]["train"]["file"] == f"{generation}/train/labels.npy"
    assert manifest["labels"]["test"]["file"] == f"{generation}/test/labels.npy"
    assert (train["ids"]["file"], test["ids"]["file"]) == (f"{generation}/train/ids.json", f"{generation}/test/ids.json")


def test_prepare_publishes_keyed_id_pseudonyms_not_raw_ids(clinic_bundle):
    # Prepare
    out, cfg = clinic_bundle["exchange"] / "clinic_a", clinic_bundle["cfg"]
    raw_ids = read_csv_text(clinic_bundle["csv"])["id"]
    train_ids, test_ids = split_ids(raw_ids, seed=cfg.seed, test_fraction=cfg.data.test_fraction)
    # Execute
    manifest = clinic_bundle["manifest"]
    published = {s: json.loads((out / manifest["splits"][s]["ids"]["file"]).read_text()) for s in ("train", "test")}
    # Assert
    key = id_key(cfg)
    assert published["train"] == sorted(pseudonyms.pseudonyms(train_ids, key))  # split by seed, ordered by key
    assert published["test"] == sorted(pseudonyms.pseudonyms(test_ids, key))
    assert not set(raw_ids) & set(published["train"] + published["test"])


def test_prepare_leaves_the_owner_csv_unchanged(clinic_bundle):
    # Prepare / Execute: the bundle fixture ran prepare() on the CSV
    csv = clinic_bundle["csv"]
    # Assert
    assert store.sha256_file(csv) == clinic_bundle["csv_sha256_before"]


# ---- the trainer's side of the exchange -----------------------------------------------------
def test_store_loads_a_batch_with_one_blob_per_manifest_entry_and_its_labels(clinic_bundle, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    manifest = clinic_bundle["manifest"]
    exchange = open_store(clinic_bundle["cfg"], holder, clinic_bundle["exchange"])
    ref = BatchRef("train", ("clinic_a",), 1)
    entry = manifest["splits"]["train"]["batches"][1]
    csv = pd.read_csv(clinic_bundle["csv"], dtype={"id": str})
    label_of = dict(zip(pseudonyms.pseudonyms(csv["id"].to_numpy(), id_key(clinic_bundle["cfg"])), csv["label"]))
    train_hashes = json.loads((clinic_bundle["exchange"] / "clinic_a" / clinic_bundle["manifest"]["splits"]["train"]["ids"]["file"]).read_text())
    # Execute
    refs = exchange.batches("train")
    batch = exchange.load(ref)
    labels = exchange.labels(ref)
    # Assert
    assert [r.index for r in refs] == [0, 1, 2, 3] and ref in refs
    assert batch.batch_id == "train/clinic_a/b0001" and batch.n == 64
    (part,) = batch.parts
    assert part.owner == "clinic_a"
    np.testing.assert_array_equal(part.feature_index, np.arange(30))
    assert len(part.rows) == len(entry["rows"]) and len(part.cols) == len(entry["cols"])
    assert [len(b) for b in part.rows + part.cols] == [e["bytes"] for e in entry["rows"] + entry["cols"]]
    np.testing.assert_array_equal(labels, [label_of[h] for h in train_hashes[64:128]])


def test_twin_features_are_csv_rows_standardised_on_train_and_clipped_in_published_order(clinic_bundle, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    cfg = clinic_bundle["cfg"]
    features = owner_of(cfg, "clinic_a").features
    exchange = open_store(cfg, holder, clinic_bundle["exchange"])
    train_hashes = json.loads((clinic_bundle["exchange"] / "clinic_a" / clinic_bundle["manifest"]["splits"]["train"]["ids"]["file"]).read_text())
    expected = expected_standardised(clinic_bundle["csv"], features, train_hashes, id_key(cfg))
    # Execute
    twin = exchange.twin_batch(clinic_bundle["twin_dir"], BatchRef("train", ("clinic_a",), 2))
    with np.load(clinic_bundle["twin_dir"] / "clinic_a.npz") as data:
        whole_train = data["train"]
    # Assert
    assert np.abs(expected).max() == 4.0  # the clip is exercised by this data
    np.testing.assert_allclose(twin.x, expected[128:192], rtol=0, atol=1e-12)
    np.testing.assert_allclose(whole_train, expected, rtol=0, atol=1e-12)


def test_decrypted_forward_of_a_batch_matches_its_plaintext_twin(clinic_bundle, ckks_keys):
    # Prepare
    holder, context = ckks_keys
    cfg = clinic_bundle["cfg"]
    plan = packing_plan(cfg)
    exchange = open_store(cfg, holder, clinic_bundle["exchange"])
    ref = BatchRef("train", ("clinic_a",), 3)  # the 40-row tail batch
    weight = np.random.default_rng(0).uniform(-0.5, 0.5, size=(30, 8))
    # Execute
    revealed, atol = revealed_forward(holder, context, plan, exchange.load(ref), weight)
    twin = PlainInputLinear("enc1", weight).forward(exchange.twin_batch(clinic_bundle["twin_dir"], ref))
    # Assert
    assert revealed.shape == twin.shape == (40, 8)
    np.testing.assert_allclose(revealed, twin, rtol=0, atol=atol)


# ---- reuse and re-encryption ----------------------------------------------------------------
def test_prepare_again_with_same_inputs_reuses_bundle_without_rewriting_files(demo_data, ckks_keys, tmp_path):
    # Prepare
    holder, _ = ckks_keys
    cfg = build_config("breast_cancer", {"clinic_a": demo_data / "breast_cancer" / "clinic_a.csv"})
    first = prepare_owners(cfg, holder, tmp_path / "exchange", tmp_path / "owners")["clinic_a"]
    before = file_state(tmp_path)
    # Execute
    again = prepare_owners(cfg, holder, tmp_path / "exchange", tmp_path / "owners")["clinic_a"]
    # Assert
    assert again["reused"] is True
    assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}
    assert file_state(tmp_path) == before


def _append_row(frame: pd.DataFrame) -> pd.DataFrame:
    extra = frame.iloc[[0]].copy()
    extra["id"] = "bc-9999"
    return pd.concat([frame, extra], ignore_index=True)


def _edit_value(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[5, "mean_radius"] = str(float(frame.loc[5, "mean_radius"]) + 1.0)
    return frame


@pytest.mark.parametrize("change, total_rows", [(_append_row, 285), (_edit_value, 284)],
                         ids=["append_row", "edit_value"])
def test_prepare_after_the_csv_changed_re_encrypts_with_the_new_digest(demo_data, ckks_keys, tmp_path,
                                                                       change, total_rows):
    # Prepare
    holder, _ = ckks_keys
    csv = write_csv_text(read_csv_text(demo_data / "breast_cancer" / "clinic_a.csv"), tmp_path / "clinic_a.csv")
    cfg = build_config("breast_cancer", {"clinic_a": csv})
    first = prepare_owners(cfg, holder, tmp_path / "exchange")["clinic_a"]
    write_csv_text(change(read_csv_text(csv)), csv)
    # Execute
    again = prepare_owners(cfg, holder, tmp_path / "exchange")["clinic_a"]
    # Assert
    assert again["reused"] is False
    assert again["data_sha256"] == store.sha256_file(csv) != first["data_sha256"]
    assert again["bundle_key"] != first["bundle_key"]
    assert json.loads((tmp_path / "exchange" / "clinic_a" / MANIFEST).read_text()) == again
    assert again["splits"]["train"]["n"] + again["splits"]["test"]["n"] == total_rows
    exchange = open_store(cfg, holder, tmp_path / "exchange")
    for ref in exchange.batches("train"):  # every blob the new manifest names is intact
        exchange.load(ref)


# ---- batching -------------------------------------------------------------------------------
def test_tail_smaller_than_min_batch_is_merged_into_the_previous_batch(demo_data, ckks_keys, tmp_path):
    # Prepare: 69 train rows and 10 test rows, batch_size 32 → [32, 32, 5] before merging
    holder, _ = ckks_keys
    frame = read_csv_text(demo_data / "breast_cancer" / "clinic_a.csv")
    train_ids, test_ids = split_ids(frame["id"], seed=7, test_fraction=0.2)
    keep = set(train_ids[:69]) | set(test_ids[:10])
    csv = write_csv_text(frame[frame["id"].isin(keep)], tmp_path / "clinic_a.csv")
    cfg = build_config("breast_cancer", {"clinic_a": csv}, batch_size=32, min_batch=8)
    # Execute
    manifest = prepare_owners(cfg, holder, tmp_path / "exchange")["clinic_a"]
    exchange = open_store(cfg, holder, tmp_path / "exchange")
    merged = exchange.load(BatchRef("train", ("clinic_a",), 1))
    # Assert
    assert [b["n"] for b in manifest["splits"]["train"]["batches"]] == [32, 37]
    assert [b["n"] for b in manifest["splits"]["test"]["batches"]] == [10]  # a lone batch stays as it is
    assert merged.n == 37
    assert len(exchange.labels(BatchRef("train", ("clinic_a",), 1))) == 37


# ---- vertical partitions --------------------------------------------------------------------
def test_vertical_owners_align_and_each_batch_spans_both_owners_feature_ranges(digits_bundle, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    bank, telco = digits_bundle["manifests"]["bank"], digits_bundle["manifests"]["telco"]
    # Execute
    exchange = open_store(digits_bundle["cfg"], holder, digits_bundle["exchange"])
    refs = exchange.batches("train")
    batch = exchange.load(refs[0])
    # Assert
    assert [b["n"] for b in bank["splits"]["train"]["batches"]] == \
        [b["n"] for b in telco["splits"]["train"]["batches"]]
    assert bank["labels"] is None and telco["labels"] is not None
    assert [r.owners for r in refs] == [("bank", "telco")] * len(bank["splits"]["train"]["batches"])
    assert [p.owner for p in batch.parts] == ["bank", "telco"]
    np.testing.assert_array_equal(batch.parts[0].feature_index, np.arange(0, 32))
    np.testing.assert_array_equal(batch.parts[1].feature_index, np.arange(32, 64))
    assert batch.n == 128 and len(exchange.labels(refs[0])) == 128


def test_vertical_decrypted_forward_matches_the_joined_twins_row_by_row(digits_bundle, ckks_keys):
    # Prepare
    holder, context = ckks_keys
    cfg = digits_bundle["cfg"]
    exchange = open_store(cfg, holder, digits_bundle["exchange"])
    ref = exchange.batches("train")[1]
    first = digits_bundle["manifests"]["bank"]["splits"]["train"]["batches"][0]["n"]
    rows = slice(first, first + exchange.load(ref).n)
    twins = []
    for owner in ("bank", "telco"):
        with np.load(digits_bundle["twin_dir"] / f"{owner}.npz") as data:
            twins.append(data["train"][rows])
    weight = np.random.default_rng(1).uniform(-0.3, 0.3, size=(64, 8))
    # Execute
    revealed, atol = revealed_forward(holder, context, packing_plan(cfg), exchange.load(ref), weight)
    twin = PlainInputLinear("enc1", weight).forward(PlainBatch(ref.batch_id, np.hstack(twins)))
    # Assert
    np.testing.assert_allclose(revealed, twin, rtol=0, atol=atol)


def test_vertical_owner_missing_ids_raises_alignment_error_naming_owners_and_counts(
        digits_tables, digits_bundle, ckks_keys, tmp_path):
    # Prepare: telco lacks 5 of the training IDs; bank's bundle is the aligned one
    holder, _ = ckks_keys
    cfg_seed = digits_bundle["cfg"].seed
    frame = read_csv_text(digits_tables["telco"])
    train_ids, _ = split_ids(frame["id"], seed=cfg_seed, test_fraction=0.2)
    csv = write_csv_text(frame[~frame["id"].isin(set(train_ids[:5]))], tmp_path / "telco_pixels.csv")
    cfg = build_config("digits_vertical", {"bank": digits_tables["bank"], "telco": csv})
    shutil.copytree(digits_bundle["exchange"] / "bank", tmp_path / "exchange" / "bank")
    prepare_owners(cfg, holder, tmp_path / "exchange", only=("telco",))
    n = len(train_ids)
    # Execute / Assert
    with pytest.raises(AlignmentError, match=re.escape(
            f"owners 'bank' and 'telco' do not hold the same IDs in the train split: {n} vs {n - 5} IDs, "
            f"5 of 'bank' missing at 'telco', 0 of 'telco' unknown to 'bank'")):
        open_store(cfg, holder, tmp_path / "exchange")


# ---- tampered or foreign bundles ------------------------------------------------------------
def _first_rows_blob(manifest: dict) -> dict:
    return manifest["splits"]["train"]["batches"][0]["rows"][0]


def test_flipped_byte_in_a_ciphertext_raises_digest_mismatch_naming_the_file(clinic_bundle, clinic_copy, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    entry = _first_rows_blob(clinic_bundle["manifest"])
    path = clinic_copy / "clinic_a" / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    exchange = open_store(clinic_bundle["cfg"], holder, clinic_copy)
    # Execute / Assert
    with pytest.raises(DigestMismatch, match=rf"owner 'clinic_a': blob {re.escape(str(path))} has SHA-256 "
                                             rf"[0-9a-f]{{64}}, the manifest says {entry['sha256']};"):
        exchange.load(BatchRef("train", ("clinic_a",), 0))


def test_truncated_ciphertext_raises_bundle_error_with_both_sizes(clinic_bundle, clinic_copy, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    entry = _first_rows_blob(clinic_bundle["manifest"])
    path = clinic_copy / "clinic_a" / entry["file"]
    path.write_bytes(path.read_bytes()[:-100])
    exchange = open_store(clinic_bundle["cfg"], holder, clinic_copy)
    # Execute
    with pytest.raises(BundleError) as caught:
        exchange.load(BatchRef("train", ("clinic_a",), 0))
    # Assert
    assert caught.type is BundleError
    assert re.search(rf"blob {re.escape(str(path))} is {entry['bytes'] - 100} bytes; "
                     rf"the manifest says {entry['bytes']}", str(caught.value))


def test_deleted_ciphertext_raises_bundle_error_saying_it_is_missing(clinic_bundle, clinic_copy, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    path = clinic_copy / "clinic_a" / _first_rows_blob(clinic_bundle["manifest"])["file"]
    path.unlink()
    exchange = open_store(clinic_bundle["cfg"], holder, clinic_copy)
    # Execute / Assert
    with pytest.raises(BundleError, match=rf"owner 'clinic_a': blob {re.escape(str(path))} named in the "
                                          rf"manifest is missing"):
        exchange.load(BatchRef("train", ("clinic_a",), 0))


def test_bundle_made_under_another_key_raises_foreign_key_error_naming_both_key_ids(
        demo_data, ckks_keys, tmp_path):
    # Prepare
    holder, _ = ckks_keys
    policy = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}}, min_batch=32)
    other = KeyHolder.open_or_create(tmp_path / "other_key_holder", CkksParams(), policy,
                                     {"enc1": LinearShape(30, 8)})
    cfg = build_config("breast_cancer", {"clinic_a": demo_data / "breast_cancer" / "clinic_a.csv"})
    prepare_owners(cfg, other, tmp_path / "exchange")
    # Execute / Assert
    assert other.key_id != holder.key_id
    with pytest.raises(ForeignKeyError, match=re.escape(
            f"owner 'clinic_a': bundle was encrypted under key id '{other.key_id}', but the key holder's "
            f"key id is '{holder.key_id}'; the owner must re-encrypt")):
        open_store(cfg, holder, tmp_path / "exchange")


def test_manifest_that_is_not_json_raises_bundle_error(clinic_bundle, clinic_copy, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    path = clinic_copy / "clinic_a" / MANIFEST
    path.write_text('{"key_id": "k-', encoding="utf-8")
    # Execute
    with pytest.raises(BundleError) as caught:
        open_store(clinic_bundle["cfg"], holder, clinic_copy)
    # Assert
    assert caught.type is BundleError
    assert re.search(rf"owner 'clinic_a': manifest {re.escape(str(path))} is not valid JSON \(", str(caught.value))


def test_missing_manifest_raises_bundle_error_asking_for_preparation(clinic_bundle, clinic_copy, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    path = clinic_copy / "clinic_a" / MANIFEST
    path.unlink()
    # Execute / Assert
    with pytest.raises(BundleError, match=rf"owner 'clinic_a': no manifest at {re.escape(str(path))}; "
                                          rf"run the owner's preparation first"):
        open_store(clinic_bundle["cfg"], holder, clinic_copy)


def test_bundle_in_another_layout_raises_bundle_error_naming_both_layouts(clinic_bundle, ckks_keys):
    # Prepare
    holder, _ = ckks_keys
    plan = PackingPlan(slots=4096, seg=64)
    # Execute / Assert
    with pytest.raises(BundleError, match=re.escape(
            "owner 'clinic_a': layout {'forward': 'rows', 'samples_per_ct': 128, 'seg': 32, 'slots': 4096} "
            "differs from the plan {'slots': 4096, 'seg': 64, 'samples_per_ct': 64, 'forward': 'rows'}")):
        ExchangeStore(clinic_bundle["exchange"], clinic_bundle["cfg"], holder.key_id, plan)


# ---- bad tables -----------------------------------------------------------------------------
def _drop_column(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["mean_area"])


def _nan_cell(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[2, "mean_radius"] = "NaN"
    return frame


def _duplicate_id(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[3, "id"] = frame.loc[2, "id"]
    return frame


@pytest.mark.parametrize("corrupt, message", [
    (_drop_column, r"owner 'clinic_a', file '.*clinic_a\.csv': missing column\(s\) \['mean_area'\]"),
    (_nan_cell, r"column 'mean_radius', line 4: empty or NaN cell \(got 'NaN'\)"),
    (_duplicate_id, r"column 'id': duplicate IDs: 'bc-\d{4}' on line 4, line 5"),
], ids=["missing_column", "nan_cell", "duplicate_id"])
def test_bad_table_raises_schema_error_and_writes_nothing(demo_data, ckks_keys, tmp_path, corrupt, message):
    # Prepare
    holder, _ = ckks_keys
    frame = corrupt(read_csv_text(demo_data / "breast_cancer" / "clinic_a.csv"))
    csv = write_csv_text(frame, tmp_path / "clinic_a.csv")
    cfg = build_config("breast_cancer", {"clinic_a": csv})
    out = tmp_path / "exchange" / "clinic_a"
    # Execute
    with pytest.raises(SchemaError, match=message):
        prepare_owners(cfg, holder, tmp_path / "exchange", tmp_path / "owners")
    # Assert
    assert not (out / MANIFEST).exists()
    assert not out.exists() or not any(out.rglob("*"))
    assert not (tmp_path / "owners" / "clinic_a.npz").exists()


# ---- regressions: reuse keys, stale twins, manifests that point elsewhere --------------------
def test_changing_the_label_column_re_encrypts_instead_of_reusing(clinic_bundle, ckks_keys, tmp_path):
    # Prepare
    holder, _ = ckks_keys
    frame = read_csv_text(clinic_bundle["csv"])
    frame["label2"] = frame["label"]
    csv = write_csv_text(frame, tmp_path / "clinic_a.csv")
    cfg = build_config("breast_cancer", {"clinic_a": csv})
    first = prepare_owners(cfg, holder, tmp_path / "exchange")["clinic_a"]
    raw = cfg.model_dump(mode="json")
    raw["data"]["label_column"] = "label2"
    cfg2 = parse_config(raw)
    # Execute
    second = prepare_owners(cfg2, holder, tmp_path / "exchange")["clinic_a"]
    # Assert
    assert first["reused"] is False and second["reused"] is False
    assert second["bundle_key"] != first["bundle_key"]


def test_stale_twin_file_forces_re_encryption(clinic_bundle, ckks_keys, tmp_path):
    # Prepare: bundle with a twin, then the twin file is overwritten by something else
    holder, _ = ckks_keys
    cfg = clinic_bundle["cfg"]
    prepare_owners(cfg, holder, tmp_path / "exchange", tmp_path / "owners")
    np.savez(tmp_path / "owners" / "clinic_a.npz", train=np.zeros((1, 1)), test=np.zeros((1, 1)))
    # Execute
    again = prepare_owners(cfg, holder, tmp_path / "exchange", tmp_path / "owners")["clinic_a"]
    # Assert
    assert again["reused"] is False
    assert store.sha256_file(tmp_path / "owners" / "clinic_a.npz") == again["twin_sha256"]


def test_re_encryption_keeps_only_the_new_generation_of_blobs(clinic_bundle, ckks_keys, tmp_path):
    # Prepare
    holder, _ = ckks_keys
    frame = read_csv_text(clinic_bundle["csv"])
    csv = write_csv_text(frame, tmp_path / "clinic_a.csv")
    cfg = build_config("breast_cancer", {"clinic_a": csv})
    prepare_owners(cfg, holder, tmp_path / "exchange")
    write_csv_text(frame.iloc[:-1], csv)
    # Execute
    manifest = prepare_owners(cfg, holder, tmp_path / "exchange")["clinic_a"]
    # Assert
    generations = sorted(p.name for p in (tmp_path / "exchange" / "clinic_a").glob("g-*"))
    assert generations == [manifest["splits"]["train"]["ids"]["file"].split("/")[0]]


def test_manifest_naming_a_file_outside_the_owner_folder_is_refused(clinic_bundle, ckks_keys, clinic_copy, tmp_path):
    # Prepare: a manifest entry that points at another file, with that file's correct digest
    holder, _ = ckks_keys
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"x" * 300)
    path = clinic_copy / "clinic_a" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["batches"][0]["rows"][0] = {
        "file": "../../secret.txt", "sha256": store.sha256_file(outside), "bytes": 300}
    path.write_text(json.dumps(manifest))
    exchange = open_store(clinic_bundle["cfg"], holder, clinic_copy)
    # Execute / Assert
    with pytest.raises(BundleError, match="outside the owner's folder"):
        exchange.load(BatchRef("train", ("clinic_a",), 0))


def test_manifest_with_other_features_than_the_config_is_refused(clinic_bundle, ckks_keys, clinic_copy):
    # Prepare
    holder, _ = ckks_keys
    path = clinic_copy / "clinic_a" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["features"] = manifest["features"][:20]
    path.write_text(json.dumps(manifest))
    # Execute / Assert
    with pytest.raises(BundleError, match="but the config declares"):
        open_store(clinic_bundle["cfg"], holder, clinic_copy)


def test_manifest_blob_entry_without_bytes_is_a_bundle_error(clinic_bundle, ckks_keys, clinic_copy):
    # Prepare
    holder, _ = ckks_keys
    path = clinic_copy / "clinic_a" / MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["splits"]["train"]["batches"][1]["cols"][0]["bytes"]
    path.write_text(json.dumps(manifest))
    # Execute / Assert
    with pytest.raises(BundleError, match="train batch 1 is malformed"):
        open_store(clinic_bundle["cfg"], holder, clinic_copy)


# ---- hostile manifests, ids and label files: always a BundleError ---------------------------
def _edit_manifest(exchange: Path, edit) -> None:
    path = exchange / "clinic_a" / MANIFEST
    manifest = json.loads(path.read_text())
    result = edit(manifest)
    path.write_text(result if isinstance(result, str) else json.dumps(manifest))


def _replace_blob(exchange: Path, entry: dict, data: bytes) -> None:
    """Overwrite a bundle file and make its manifest entry vouch for the new bytes (a hostile owner can)."""
    (exchange / "clinic_a" / entry["file"]).write_bytes(data)
    entry.update(sha256=store.sha256_bytes(data), bytes=len(data))


def _npy(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


MANIFEST_EDITS = {
    "top level is a list": (lambda m: "[]", r"manifest .* the top level must be a JSON object, got list"),
    "deeply nested": (lambda m: "[" * 100_000 + "]" * 100_000, r"manifest .* is not valid JSON"),
    "rows is a string": (lambda m: m["splits"]["train"]["batches"][0].update(rows="abc"),
                         r"train batch 0: 'rows' must list 1 blob entries for 64 samples; got str"),
    "a rows blob missing": (lambda m: m["splits"]["train"]["batches"][0]["rows"].clear(),
                            r"train batch 0: 'rows' must list 1 blob entries for 64 samples; got 0"),
    "batch n over twice the batch size": (lambda m: m["splits"]["train"]["batches"][0].update(n=10**9),
                                          r"train batch 0 is malformed \(needs n in \[1, 128\]\)"),
    "split n disagrees with batches": (lambda m: m["splits"]["test"].update(n=m["splits"]["test"]["n"] + 1),
                                       r"test batches hold \d+ samples but the split declares n=\d+"),
    "file name with a NUL byte": (lambda m: m["splits"]["train"]["batches"][0]["rows"][0].update(file="a\0b"),
                                  r"train batch 0 is malformed: 'rows' entry 0 needs a file name of 1\.\.512"),
    "labels missing for the label owner": (lambda m: m.update(labels=None),
                                           r"malformed or missing label entries \(the config says this owner"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_hostile_manifest_is_a_bundle_error_naming_the_field(clinic_bundle, ckks_keys, clinic_copy, case):
    # Prepare
    holder, _ = ckks_keys
    edit, message = MANIFEST_EDITS[case]
    _edit_manifest(clinic_copy, edit)

    # Execute / Assert
    with pytest.raises(BundleError, match=message):
        open_store(clinic_bundle["cfg"], holder, clinic_copy)


LABEL_FILES = {
    "float labels": (lambda n: _npy(np.zeros(n)), r"dtype float64 is not allowed \(allowed kinds: 'iu'"),
    "label out of range": (lambda n: _npy(np.full(n, 7, dtype=np.int64)), r"must hold \d+ integer labels in \[0, 1\]; "
                                                                          r"got shape \(\d+,\), range \[7, 7\]"),
    "too few labels": (lambda n: _npy(np.zeros(n - 1, dtype=np.int64)), r"must hold \d+ integer labels"),
    "shape bomb header": (lambda n: _npy(np.zeros(1, dtype=np.int64)).replace(b"(1,)", b"(9999999999,)", 1),
                          r"header declares shape \(9999999999,\)"),
    "pickled object array": (lambda n: b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
                             + b" " * 52 + b"\n" + b"\x80\x04N.", r"labels .*(not a valid \.npy|dtype object)"),
    "not npy at all": (lambda n: b"garbage", r"not a valid \.npy array"),
}


@pytest.mark.parametrize("case", sorted(LABEL_FILES))
def test_hostile_label_file_is_a_bundle_error_before_numpy_allocates(clinic_bundle, ckks_keys, clinic_copy, case):
    # Prepare
    holder, _ = ckks_keys
    make, message = LABEL_FILES[case]
    n = clinic_bundle["manifest"]["splits"]["train"]["n"]
    _edit_manifest(clinic_copy, lambda m: _replace_blob(clinic_copy, m["labels"]["train"], make(n)))
    exchange = open_store(clinic_bundle["cfg"], holder, clinic_copy)

    # Execute / Assert
    with pytest.raises(BundleError, match=message):
        exchange.labels(BatchRef("train", ("clinic_a",), 0))


@pytest.mark.parametrize("ids, message", [
    (b"not json", r"train ids .* is not valid JSON"),
    (b'{"a": 1}', r"the top level must be a JSON list, got dict"),
    (b'["zz"]', r"must list \d+ pseudonyms of 24 hex digits; got 1 entries"),
], ids=["not JSON", "an object", "bad pseudonym"])
def test_hostile_ids_file_of_a_vertical_owner_is_a_bundle_error(digits_bundle, ckks_keys, tmp_path, ids, message):
    # Prepare
    holder, _ = ckks_keys
    exchange = tmp_path / "exchange"
    shutil.copytree(digits_bundle["exchange"], exchange)
    path = exchange / "telco" / MANIFEST
    manifest = json.loads(path.read_text())
    entry = manifest["splits"]["train"]["ids"]
    (exchange / "telco" / entry["file"]).write_bytes(ids)
    entry.update(sha256=store.sha256_bytes(ids), bytes=len(ids))
    path.write_text(json.dumps(manifest))

    # Execute / Assert
    with pytest.raises(BundleError, match=message):
        open_store(digits_bundle["cfg"], holder, exchange)


def test_owner_re_encrypts_over_a_hostile_old_manifest_instead_of_crashing(clinic_bundle, ckks_keys, clinic_copy):
    # Prepare: the old manifest keeps the right bundle key but lost its splits
    holder, _ = ckks_keys
    _edit_manifest(clinic_copy, lambda m: m.pop("splits"))
    cfg = clinic_bundle["cfg"]

    # Execute
    manifest = prepare(cfg, owner_of(cfg, "clinic_a"), holder.public_context(), packing_plan(cfg), clinic_copy)

    # Assert
    assert manifest["reused"] is False
    assert open_store(cfg, holder, clinic_copy).manifests["clinic_a"]["bundle_key"] == manifest["bundle_key"]
