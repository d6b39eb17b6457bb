"""The exchange store at a path or fsspec URL: owners publish (blobs first, manifest last), the trainer
mirrors into RUN_DIR/exchange, checking every size before download and every digest after."""

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import yaml

from hetrain.core import store
from hetrain.mpc_ops.exchange.bundle import ExchangeStore
from hetrain.configure import load_config, parse_config
from hetrain.core.config import ExchangeConfig
from hetrain.core.errors import BundleError, ConfigError, DigestMismatch, ExchangeUnavailable
from hetrain.mpc_ops.exchange.remote import MANIFEST, RemoteExchange, blob_entries
from tests.conftest import write_config
from tests.test_data_owner import build_config, file_state, prepare_owners

from hetrain.runtime import packing_plan


@pytest.fixture(scope="module")
def outbox(demo_data, ckks_keys, tmp_path_factory):
    """clinic_a's bundle, prepared once in an owner's local outbox."""
    holder, _ = ckks_keys
    root = tmp_path_factory.mktemp("outbox")
    cfg = build_config("breast_cancer", {"clinic_a": demo_data / "breast_cancer" / "clinic_a.csv"})
    prepare_owners(cfg, holder, root)
    return {"cfg": cfg, "dir": root / "clinic_a"}


@pytest.fixture
def remote():
    """A fresh in-memory object store (fsspec's memory:// filesystem), removed afterwards."""
    url = f"memory://hetrain-test-{uuid.uuid4().hex[:8]}/run"
    remote = RemoteExchange(url)
    yield remote
    remote.fs.rm(remote.root, recursive=True)


def remote_files(r: RemoteExchange) -> dict[str, bytes]:
    return {p[len(r.root) + 1:]: r.fs.cat_file(p) for p in r.fs.find(r.root)}


def test_publish_then_mirror_copies_every_blob_byte_for_byte_and_the_store_reads_them(outbox, remote, ckks_keys,
                                                                                       tmp_path):
    # Prepare
    holder, _ = ckks_keys
    local = {str(p.relative_to(outbox["dir"])): p.read_bytes() for p in outbox["dir"].rglob("*") if p.is_file()}
    # Execute
    published = remote.publish_owner(outbox["dir"], "clinic_a")
    fetched = remote.mirror_owner("clinic_a", tmp_path / "exchange")
    # Assert: the URL and the mirror hold exactly the owner's files, and the trainer's reader accepts them
    assert remote_files(remote) == {f"clinic_a/{k}": v for k, v in local.items()}
    assert published == {"files": len(local) - 1, "bytes": sum(len(v) for k, v in local.items() if k != MANIFEST)}
    assert fetched == published
    mirrored = tmp_path / "exchange" / "clinic_a"
    assert {str(p.relative_to(mirrored)): p.read_bytes() for p in mirrored.rglob("*") if p.is_file()} == local
    readers = [ExchangeStore(root, outbox["cfg"], holder.key_id, packing_plan(outbox["cfg"]))
               for root in (tmp_path / "exchange", outbox["dir"].parent)]
    mirror_batch, owner_batch = (r.load(r.batches("train")[-1]) for r in readers)
    assert mirror_batch.n == owner_batch.n > 0 and mirror_batch.rows == owner_batch.rows
    assert mirror_batch.parts[0].rows == owner_batch.parts[0].rows != []


def test_an_unchanged_bundle_is_neither_uploaded_nor_fetched_again(outbox, remote, tmp_path):
    # Prepare
    remote.publish_owner(outbox["dir"], "clinic_a")
    remote.mirror_owner("clinic_a", tmp_path / "exchange")
    before = file_state(tmp_path / "exchange")
    fetched_before = remote.bytes_fetched
    # Execute
    again_up = remote.publish_owner(outbox["dir"], "clinic_a")
    again_down = remote.mirror_owner("clinic_a", tmp_path / "exchange")
    # Assert: only the two manifests were read (a few KB), no blob moved, the mirror is untouched
    assert again_up == again_down == {"files": 0, "bytes": 0}
    manifest_size = len((outbox["dir"] / MANIFEST).read_bytes())
    assert remote.bytes_fetched - fetched_before == 2 * manifest_size
    assert file_state(tmp_path / "exchange") == before


def test_a_republished_bundle_replaces_the_mirror_and_old_generations_go(outbox, remote, demo_data, ckks_keys,
                                                                          tmp_path):
    # Prepare: an owner whose table changes between two publications
    holder, _ = ckks_keys
    csv = tmp_path / "clinic_a.csv"
    shutil.copyfile(demo_data / "breast_cancer" / "clinic_a.csv", csv)
    cfg = build_config("breast_cancer", {"clinic_a": csv})
    first = prepare_owners(cfg, holder, tmp_path / "outbox")["clinic_a"]
    remote.publish_owner(tmp_path / "outbox" / "clinic_a", "clinic_a")
    remote.mirror_owner("clinic_a", tmp_path / "exchange")
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    extra = frame.iloc[[0]].copy()
    extra["id"] = "bc-9999"
    pd.concat([frame, extra], ignore_index=True).to_csv(csv, index=False)
    # Execute
    second = prepare_owners(cfg, holder, tmp_path / "outbox")["clinic_a"]
    remote.publish_owner(tmp_path / "outbox" / "clinic_a", "clinic_a")
    remote.mirror_owner("clinic_a", tmp_path / "exchange")
    third = prepare_owners(cfg, holder, tmp_path / "outbox", only=("clinic_a",))["clinic_a"]
    # Assert: the mirror holds the new manifest and only its generation; the URL keeps one previous generation
    # (a trainer may still be mirroring it) and no older one
    gen = lambda m: blob_entries(m, "clinic_a")[0]["file"].split("/")[0]  # noqa: E731
    assert second["bundle_key"] != first["bundle_key"] and third["reused"] is True
    assert json.loads((tmp_path / "exchange" / "clinic_a" / MANIFEST).read_bytes()) == second
    assert sorted(p.name for p in (tmp_path / "exchange" / "clinic_a").glob("g-*")) == [gen(second)]
    remote_gens = {p.split("/")[-1] for p in remote.fs.ls(f"{remote.root}/clinic_a", detail=False)} - {MANIFEST}
    assert remote_gens == {gen(first), gen(second)}


def test_a_tampered_blob_at_the_url_is_a_digest_mismatch_and_no_manifest_is_mirrored(outbox, remote, tmp_path):
    # Prepare: someone flips a byte in one published ciphertext
    remote.publish_owner(outbox["dir"], "clinic_a")
    entry = blob_entries(json.loads((outbox["dir"] / MANIFEST).read_bytes()), "clinic_a")[3]
    path = f"{remote.root}/clinic_a/{entry['file']}"
    data = bytearray(remote.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    remote.fs.pipe_file(path, bytes(data))
    # Execute / Assert
    with pytest.raises(DigestMismatch, match=rf"owner 'clinic_a': blob memory://.*/clinic_a/{entry['file']} has "
                                             rf"SHA-256 [0-9a-f]{{64}}, its manifest says {entry['sha256']}"):
        remote.mirror_owner("clinic_a", tmp_path / "exchange")
    assert not (tmp_path / "exchange" / "clinic_a" / MANIFEST).exists()  # the trainer's reader sees no bundle
    assert not (tmp_path / "exchange" / "clinic_a" / entry["file"]).exists()


def test_a_mirrored_blob_already_verified_is_not_fetched_again_even_if_the_url_changes_it(outbox, remote, tmp_path):
    # Prepare: a good mirror, then the published copy of one blob is damaged
    remote.publish_owner(outbox["dir"], "clinic_a")
    remote.mirror_owner("clinic_a", tmp_path / "exchange")
    before = file_state(tmp_path / "exchange")
    entry = blob_entries(json.loads((outbox["dir"] / MANIFEST).read_bytes()), "clinic_a")[3]
    remote.fs.pipe_file(f"{remote.root}/clinic_a/{entry['file']}", b"\0" * entry["bytes"])
    # Execute
    fetched = remote.mirror_owner("clinic_a", tmp_path / "exchange")
    # Assert: the local copy, whose SHA-256 matched when it was fetched, stays as it was
    assert fetched == {"files": 0, "bytes": 0}
    assert file_state(tmp_path / "exchange") == before


def test_a_blob_whose_size_differs_from_the_manifest_is_refused_before_download(outbox, remote, tmp_path,
                                                                                 monkeypatch):
    # Prepare: one published blob replaced by a 9 MB object
    remote.publish_owner(outbox["dir"], "clinic_a")
    entry = blob_entries(json.loads((outbox["dir"] / MANIFEST).read_bytes()), "clinic_a")[0]
    remote.fs.pipe_file(f"{remote.root}/clinic_a/{entry['file']}", b"\0" * (9 << 20))
    downloaded = []
    original = remote.fs.cat_file
    monkeypatch.setattr(remote.fs, "cat_file", lambda p, *a, **k: downloaded.append(p) or original(p, *a, **k))
    # Execute / Assert
    with pytest.raises(BundleError, match=rf"blob memory://.*/clinic_a/{entry['file']} is 9437184 bytes; its "
                                          rf"manifest says {entry['bytes']} bytes"):
        remote.mirror_owner("clinic_a", tmp_path / "exchange")
    assert not any(p.endswith(entry["file"]) for p in downloaded)
    assert not (tmp_path / "exchange" / "clinic_a" / MANIFEST).exists()


@pytest.mark.parametrize("name", ["../../escape.ct", "/etc/passwd", "g-x/../../../escape.ct", "other/x.ct", "g-x\\..\\y"])
def test_a_manifest_naming_a_file_outside_the_owners_generations_is_refused(outbox, remote, tmp_path, name):
    # Prepare
    manifest = json.loads((outbox["dir"] / MANIFEST).read_bytes())
    manifest["splits"]["train"]["ids"]["file"] = name
    remote.fs.pipe_file(f"{remote.root}/clinic_a/{MANIFEST}", json.dumps(manifest).encode())
    # Execute / Assert
    with pytest.raises(BundleError, match=r"owner 'clinic_a': manifest names the file .*; allowed: a relative "
                                          r"path of 1..512 characters inside a generation folder"):
        remote.mirror_owner("clinic_a", tmp_path / "exchange")
    assert not (tmp_path / "escape.ct").exists() and not (tmp_path / "exchange").exists()


def test_an_oversized_manifest_and_a_missing_one_are_bundle_errors(remote, tmp_path):
    # Prepare
    remote.fs.pipe_file(f"{remote.root}/big/{MANIFEST}", b" " * ((16 << 20) + 1))
    # Execute / Assert
    with pytest.raises(BundleError, match=r"owner 'big': manifest memory://.*/big/manifest.json is 16777217 bytes; "
                                          r"the limit is 16777216 bytes"):
        remote.mirror_owner("big", tmp_path)
    with pytest.raises(BundleError, match=r"owner 'nobody': no manifest at memory://.*/nobody/manifest.json; run "
                                          r"the owner's preparation first"):
        remote.mirror_owner("nobody", tmp_path)


def test_a_publication_cut_before_its_manifest_leaves_the_previous_bundle_readable(outbox, remote, tmp_path,
                                                                                    monkeypatch):
    # Prepare: a first publication, then a second whose manifest upload fails (a lost connection)
    remote.publish_owner(outbox["dir"], "clinic_a")
    before = remote.manifest_bytes("clinic_a")
    changed = tmp_path / "outbox"
    shutil.copytree(outbox["dir"], changed)
    manifest = json.loads((changed / MANIFEST).read_bytes())
    old_gen = blob_entries(manifest, "clinic_a")[0]["file"].split("/")[0]
    (changed / old_gen).rename(changed / "g-renamed")
    text = json.dumps(manifest).replace(f'"{old_gen}/', '"g-renamed/')
    (changed / MANIFEST).write_text(text)
    write = remote.write
    monkeypatch.setattr(remote, "write", lambda rel, data: (_ for _ in ()).throw(ConnectionError("reset"))
                        if rel.endswith(MANIFEST) else write(rel, data))
    # Execute
    with pytest.raises(ConnectionError):
        remote.publish_owner(changed, "clinic_a")
    monkeypatch.undo()
    fetched = remote.mirror_owner("clinic_a", tmp_path / "exchange")
    # Assert: the URL still serves the first manifest, and every blob it names is there
    assert remote.manifest_bytes("clinic_a") == before
    assert fetched["files"] == len(blob_entries(json.loads(before), "clinic_a"))


def test_a_folder_url_is_written_with_a_rename_so_no_reader_sees_half_a_file(outbox, tmp_path):
    # Prepare
    remote = RemoteExchange(f"file://{tmp_path / 'shared'}")
    # Execute
    remote.publish_owner(outbox["dir"], "clinic_a")
    # Assert: the shared folder holds the owner's files and no temporary leftovers
    shared = tmp_path / "shared" / "clinic_a"
    assert (shared / MANIFEST).read_bytes() == (outbox["dir"] / MANIFEST).read_bytes()
    assert not [p for p in shared.rglob("*") if ".tmp-" in p.name]


# ---- the config ---------------------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("foo://bucket/x", r"exchange.url 'foo://bucket/x': protocol 'foo' is not one fsspec knows \(for example file, "
                       r"memory, s3"),
    ("a::memory://x", r"exchange.url must be a single path or URL, not a chained fsspec URL"),
])
def test_an_exchange_url_fsspec_cannot_open_is_a_config_error(demo_data, tmp_path, url, message):
    # Prepare
    config = write_config(tmp_path, demo_data)
    raw = yaml.safe_load(config.read_text())
    raw["exchange"] = {"url": url}
    config.write_text(yaml.safe_dump(raw))
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_a_protocol_whose_package_is_missing_names_the_package(monkeypatch):
    # Prepare: fsspec's registry says where s3 lives; make its import fail as on a machine without s3fs
    def missing(protocol):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "breast_cancer.yaml").read_text())
    raw["exchange"] = {"url": "s3://bucket/run"}
    # Execute / Assert: the loader's check (the schema alone never probes fsspec)
    with pytest.raises(ConfigError, match=r"cfg.yaml: key 'exchange': exchange.url 's3://bucket/run': protocol 's3' "
                                          r"needs a package that is not installed \(Install s3fs to access S3\)"):
        parse_config(raw, "cfg.yaml")
    assert ExchangeConfig(url="s3://bucket/run").url == "s3://bucket/run"


def test_a_plain_folder_is_resolved_against_the_config_and_storage_options_need_a_url(demo_data, tmp_path):
    # Prepare
    config = write_config(tmp_path, demo_data)
    raw = yaml.safe_load(config.read_text())
    raw["exchange"] = {"url": "shared/exchange"}
    config.write_text(yaml.safe_dump(raw))
    # Execute
    cfg, _ = load_config(config)
    # Assert
    assert cfg.exchange.url == str(tmp_path / "shared" / "exchange")
    with pytest.raises(ValueError, match=r"exchange.storage_options needs exchange.url"):
        ExchangeConfig(storage_options={"anon": True})


# ---- end to end ---------------------------------------------------------------------------
@pytest.mark.e2e  # a full training run
def test_training_through_a_shared_folder_url_matches_its_twin(prefect_harness, demo_data, tmp_path):
    # Prepare: the shipped config, its exchange store a file:// URL outside the run directory
    from hetrain.train_flow import train

    config = write_config(tmp_path, demo_data, rounds=2)
    raw = yaml.safe_load(config.read_text())
    raw["exchange"] = {"url": f"file://{tmp_path / 'shared'}"}
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    # Execute
    result = train(str(config), str(run))
    # Assert: owners published to the URL, the trainer read its mirror, and the result is the twin's
    final = result["final"]
    assert abs(final["test_accuracy"] - final["plaintext_twin_test_accuracy"]) <= 0.03
    assert final["test_accuracy"] >= 0.9
    assert result["lineage"]["exchange"] == f"file://{tmp_path / 'shared'}"
    assert f"| exchange store | `file://{tmp_path / 'shared'}` |" in (run / "summary.md").read_text()
    for owner in ("clinic_a", "clinic_b"):
        shared = tmp_path / "shared" / owner / MANIFEST
        assert shared.read_bytes() == (run / "exchange" / owner / MANIFEST).read_bytes() \
            == (run / "outbox" / owner / MANIFEST).read_bytes()
        assert result["lineage"]["manifest_sha256"][owner] == store.sha256_file(shared)
    assert (tmp_path / "shared" / "public_context.bin").read_bytes() == \
        (run / "exchange" / "public_context.bin").read_bytes()


# ---- an object store: the S3 API (moto's local server, s3fs) ---------------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 API on a free loopback port, with a bucket `hetrain-exchange`; yields its endpoint URL."""
    import logging
    import os
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="hetrain-test", AWS_SECRET_ACCESS_KEY="hetrain-test",
                      AWS_DEFAULT_REGION="us-east-1")
    endpoint = f"http://127.0.0.1:{port}"
    fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True).mkdir("hetrain-exchange")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_an_s3_bucket_serves_as_the_exchange_store_and_another_party_tampering_is_caught(outbox, s3_endpoint,
                                                                                          tmp_path):
    # Prepare: the owner publishes to s3://; "another party" holds its own S3 client
    url = f"s3://hetrain-exchange/{uuid.uuid4().hex[:8]}"
    remote = RemoteExchange(url, {"endpoint_url": s3_endpoint})
    other = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    # Execute 1: publish, mirror
    published = remote.publish_owner(outbox["dir"], "clinic_a")
    fetched = remote.mirror_owner("clinic_a", tmp_path / "good")
    # Assert 1: the mirror is byte for byte the owner's outbox
    local = {str(p.relative_to(outbox["dir"])): p.read_bytes() for p in outbox["dir"].rglob("*") if p.is_file()}
    mirrored = {str(p.relative_to(tmp_path / "good" / "clinic_a")): p.read_bytes()
                for p in (tmp_path / "good" / "clinic_a").rglob("*") if p.is_file()}
    assert mirrored == local and fetched == published and published["files"] == len(local) - 1
    # Execute 2 / Assert 2: the other party overwrites one ciphertext; a new mirror refuses it
    entry = blob_entries(json.loads(local[MANIFEST]), "clinic_a")[2]
    key = f"hetrain-exchange/{url.rsplit('/', 1)[1]}/clinic_a/{entry['file']}"
    data = bytearray(other.cat_file(key))
    data[100] ^= 0xFF
    other.pipe_file(key, bytes(data))
    with pytest.raises(DigestMismatch, match=rf"owner 'clinic_a': blob {url}/clinic_a/{entry['file']} has SHA-256"):
        remote.mirror_owner("clinic_a", tmp_path / "fresh")


@pytest.mark.e2e  # a full training run
def test_training_through_an_s3_bucket_matches_its_twin(prefect_harness, demo_data, s3_endpoint, tmp_path):
    # Prepare: the shipped config with its exchange store in a bucket
    from hetrain.train_flow import train

    url = f"s3://hetrain-exchange/{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, demo_data, rounds=2)
    raw = yaml.safe_load(config.read_text())
    raw["exchange"] = {"url": url, "storage_options": {"endpoint_url": s3_endpoint}}
    config.write_text(yaml.safe_dump(raw))
    # Execute
    result = train(str(config), str(tmp_path / "run"))
    # Assert: trained as well as its twin, every byte of the bundles came through the bucket
    final = result["final"]
    assert final["test_accuracy"] >= 0.9
    assert abs(final["test_accuracy"] - final["plaintext_twin_test_accuracy"]) <= 0.03
    bucket = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    for owner in ("clinic_a", "clinic_b"):
        assert bucket.cat_file(f"{url[5:]}/{owner}/{MANIFEST}") == \
            (tmp_path / "run" / "exchange" / owner / MANIFEST).read_bytes()
    assert result["lineage"]["exchange"] == url


# ---- an exchange store that cannot be reached ---------------------------------------------------
def test_an_unreachable_object_store_is_exchange_unavailable_naming_the_url_and_the_cause(tmp_path, monkeypatch):
    # Prepare: an S3 endpoint where nothing listens, one attempt with a short timeout
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    remote = RemoteExchange("s3://nobucket/run", {"endpoint_url": "http://127.0.0.1:9", "skip_instance_cache": True,
                                                 "config_kwargs": {"retries": {"max_attempts": 1},
                                                                   "connect_timeout": 2}})
    # Execute / Assert
    with pytest.raises(ExchangeUnavailable, match=r"exchange store s3://nobucket/run: size of clinic_a/manifest.json "
                                                  r"failed \(EndpointConnectionError: Could not connect to the "
                                                  r"endpoint URL.*check exchange.url, exchange.storage_options"):
        remote.mirror_owner("clinic_a", tmp_path / "exchange")
    assert not (tmp_path / "exchange").exists()


@pytest.mark.e2e  # a `hetrain train` process on its own temporary server
@pytest.mark.slow
def test_hetrain_train_with_an_exchange_store_it_cannot_write_stops_with_one_line(demo_data, tmp_path):
    # Prepare: a folder URL under /proc, where no folder can be made (even by root); a fresh `hetrain` process,
    # as a user runs it (in-process, Prefect's console handler may hold a stream an earlier test closed)
    import os
    import subprocess
    import sys

    config = write_config(tmp_path, demo_data, rounds=1)
    raw = yaml.safe_load(config.read_text())
    raw["exchange"] = {"url": "file:///proc/hetrain-exchange"}
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    # Execute
    out = subprocess.run([sys.executable, "-m", "hetrain.cli", "train", str(config), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    # Assert
    err = out.stderr
    assert out.returncode == 1 and "Traceback" not in err + out.stdout, err[-2000:]
    assert "ExchangeUnavailable: exchange store file:///proc/hetrain-exchange: writing public_context.bin failed" in err
    assert not any((tmp_path / "run" / "checkpoints").glob("round-*"))
