"""Sample pseudonyms are keyed by the owners' shared secret, never by the config's public seed: a
trainer that knows the config cannot invert them by guessing the ids, nor by their order."""

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hetrain.configure import parse_config
from hetrain.core.errors import ConfigError
from hetrain.participants import pseudonyms
from hetrain.participants.data_owner import prepare
from hetrain.participants.table import split_ids
from hetrain.runtime import packing_plan

REPO = Path(__file__).resolve().parent.parent


def build(name: str, tables: dict[str, Path], **owner_fields):
    """The shipped config `name` with its owners pointed at `tables` (and extra per-owner fields)."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    raw["data"]["owners"] = [{**o, "path": str(tables[o["name"]]), **owner_fields.get(o["name"], {})}
                             for o in raw["data"]["owners"] if o["name"] in tables]
    return parse_config(raw, f"{name} (test copy)")


def test_published_pseudonyms_and_their_order_are_not_recomputable_from_the_seed(demo_data, ckks_keys, tmp_path):
    # Prepare: clinic_a's table in its own folder; the attacker knows the config (seed) and guesses every id
    holder, _ = ckks_keys
    csv = tmp_path / "clinic" / "clinic_a.csv"
    csv.parent.mkdir()
    shutil.copy(demo_data / "breast_cancer" / "clinic_a.csv", csv)
    cfg = build("breast_cancer", {"clinic_a": csv})
    ids = pd.read_csv(csv, dtype={"id": str})["id"]
    train_ids, _ = split_ids(ids, seed=cfg.seed, test_fraction=cfg.data.test_fraction)

    # Execute
    manifest = prepare(cfg, cfg.data.owners[0], holder.public_context(), packing_plan(cfg), tmp_path / "exchange")
    published = json.loads((tmp_path / "exchange" / "clinic_a" / manifest["splits"]["train"]["ids"]["file"]).read_text())

    # Assert: no guessed id hashes to a published pseudonym under the seed, and the published order is not
    # the seed-keyed order (which would map position i to the i-th guessed id)
    guessed = {hashlib.sha256(f"id:{cfg.seed}:{v}".encode()).hexdigest()[:24] for v in ids}
    assert not guessed & set(published)
    assert published != [hashlib.sha256(f"id:{cfg.seed}:{v}".encode()).hexdigest()[:24] for v in train_ids]
    key_file = csv.parent / pseudonyms.KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    assert published == pseudonyms.pseudonyms(pseudonyms.keyed_order(train_ids, key_file.read_bytes()),
                                              key_file.read_bytes())
    assert not list((tmp_path / "exchange").rglob(pseudonyms.KEY_FILE))


def test_a_new_pseudonym_key_re_encrypts_the_bundle_with_new_pseudonyms(demo_data, ckks_keys, tmp_path):
    # Prepare
    holder, _ = ckks_keys
    csv = tmp_path / "clinic_a.csv"
    shutil.copy(demo_data / "breast_cancer" / "clinic_a.csv", csv)
    cfg = build("breast_cancer", {"clinic_a": csv})
    first = prepare(cfg, cfg.data.owners[0], holder.public_context(), packing_plan(cfg), tmp_path / "exchange")
    (tmp_path / pseudonyms.KEY_FILE).unlink()

    # Execute
    again = prepare(cfg, cfg.data.owners[0], holder.public_context(), packing_plan(cfg), tmp_path / "exchange")

    # Assert
    assert not again["reused"] and again["bundle_key"] != first["bundle_key"]
    assert again["splits"]["train"]["ids"]["sha256"] != first["splits"]["train"]["ids"]["sha256"]


def test_owners_of_a_vertical_split_with_different_keys_are_refused_naming_both(demo_data, tmp_path):
    # Prepare: each owner names its own key file, and the two files hold different keys
    tables = {o: demo_data / "digits" / f"{o}_pixels.csv" for o in ("bank", "telco")}
    files = {o: tmp_path / o / "ids.key" for o in tables}
    cfg = build("digits_vertical", tables, **{o: {"pseudonym_key_file": str(f)} for o, f in files.items()})
    pseudonyms.owner_key(cfg, cfg.data.owners[0])  # bank's key is made first

    # Execute / Assert
    with pytest.raises(ConfigError, match=(
            rf"^owners 'telco' \({files['telco']}\) and 'bank' \({files['bank']}\) use different pseudonym keys; "
            r"the owners of a vertical split must share one")):
        pseudonyms.owner_key(cfg, cfg.data.owners[1])


def test_owners_sharing_one_key_file_agree_and_the_default_sits_beside_the_first_table(demo_data, tmp_path):
    # Prepare
    tables = {o: demo_data / "digits" / f"{o}_pixels.csv" for o in ("bank", "telco")}
    cfg = build("digits_vertical", tables)

    # Execute
    keys = [pseudonyms.owner_key(cfg, o) for o in cfg.data.owners]

    # Assert
    assert keys[0] == keys[1]
    assert pseudonyms.key_path(cfg, cfg.data.owners[1]) == tables["bank"].parent / pseudonyms.KEY_FILE


def test_a_key_file_others_can_read_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "ids.key"
    path.write_bytes(b"k" * 32)
    path.chmod(0o644)

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"^pseudonym key {path}: mode 0644 lets others read it; allowed: 0600"):
        pseudonyms.load_or_create(path)


def test_a_key_file_of_the_wrong_length_is_refused(tmp_path):
    path = tmp_path / "ids.key"
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=rf"^pseudonym key {path}: must hold 32 bytes, got 5$"):
        pseudonyms.load_or_create(path)
