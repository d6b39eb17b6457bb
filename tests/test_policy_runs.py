"""End-to-end runs under the new policies, through the `train` flow: strict mode and encrypted labels.

The label-privacy proof: during an encrypted-label run every path by which the trainer could
hold a plaintext label is watched (the exchange store's label readers, numpy loads of any label
or owner-local file), and the exchange store holds no plaintext label file afterwards.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.e2e  # full training runs


def config(tmp: Path, demo: Path, name: str, **overrides) -> Path:
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    for owner in raw["data"]["owners"]:
        owner["path"] = str(demo / "breast_cancer" / Path(owner["path"]).name)
    raw["report"]["plaintext_twin"] = True  # compared with the twin unless an override turns it off
    for section, values in overrides.items():
        raw[section].update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def encrypted_label_run(prefect_harness, demo_data, tmp_path_factory):
    """A breast_cancer run with labels: encrypted and no plaintext twin, with every label reader watched."""
    from hetrain.train_flow import train
    from hetrain.mpc_ops.exchange import bundle, tiled_bundle

    tmp = tmp_path_factory.mktemp("enc_labels")
    path = config(tmp, demo_data, "breast_cancer_encrypted_labels", train={"rounds": 8}, report={"plaintext_twin": False})
    raw = yaml.safe_load(path.read_text())  # owners publish through a shared-folder URL, the trainer mirrors it
    raw["exchange"] = {"url": f"file://{tmp / 'shared'}"}
    path.write_text(yaml.safe_dump(raw))
    reads: list[str] = []
    real_load = np.load

    def watched_load(file, *args, **kwargs):
        reads.append(str(file))
        return real_load(file, *args, **kwargs)

    def refuse(*_args, **_kwargs):
        raise AssertionError("the trainer read plaintext labels")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np, "load", watched_load)
        mp.setattr(bundle.ExchangeStore, "labels", refuse)
        mp.setattr(tiled_bundle.TiledStore, "labels", refuse)
        result = train(str(path), str(tmp / "run"))
    return tmp / "run", result, reads


@pytest.mark.slow
def test_encrypted_label_run_trains_breast_cancer(encrypted_label_run):
    _, result, _ = encrypted_label_run
    final = result["final"]
    assert final["policy_mode"] == "hybrid + encrypted labels"
    assert final["test_accuracy"] >= 0.93, result["rounds"]
    assert final["policy_refusals"] == 0 and final["circuit_depth"] == 2


@pytest.mark.slow
def test_encrypted_label_run_never_holds_a_plaintext_label_in_the_trainer(encrypted_label_run):
    run_dir, result, reads = encrypted_label_run
    # no label reader ran (they raise), and no numpy load touched a label or owner-local file
    assert not [r for r in reads if "label" in r or "/owners/" in r], reads
    # the exchange store (everything that leaves the owners: the shared URL and the trainer's mirror of it)
    # holds labels only as ciphertext
    shared = run_dir.parent / "shared"
    assert sorted(p.relative_to(shared) for p in shared.rglob("*.ct")) == \
        sorted(p.relative_to(run_dir / "exchange") for p in (run_dir / "exchange").rglob("*.ct"))
    files = [p for p in [*(run_dir / "exchange").rglob("*"), *shared.rglob("*")] if p.is_file()]
    assert not [p for p in files if p.suffix == ".npy"], "a plaintext array left an owner"
    label_files = [p for p in files if "label" in p.name]
    assert label_files and all(p.name.endswith(".label.ct") for p in label_files)
    for owner in ("clinic_a", "clinic_b"):
        manifest = json.loads((run_dir / "exchange" / owner / "manifest.json").read_text())
        assert manifest["labels_policy"] == "encrypted" and "labels" not in manifest
    # what the trainer learnt of the labels: aggregate metrics only (audited as 'metric' reveals)
    audit = [json.loads(line) for line in (run_dir / "key_holder" / "audit.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in audit} == {"activation", "metric", "gradient"}
    assert all(e["aggregate"] >= 32 for e in audit if e["kind"] in ("metric", "gradient"))


@pytest.mark.slow
def test_strict_run_trains_breast_cancer_revealing_only_aggregated_gradients(prefect_harness, demo_data, tmp_path,
                                                                             capsys):
    from hetrain.cli import main

    path = config(tmp_path, demo_data, "breast_cancer_strict", train={"rounds": 4})
    code = main(["train", str(path), "--run-dir", str(tmp_path / "run")])  # as a user runs it
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.out + out.err, out.err[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    final = metrics["final"]
    assert final["policy_mode"] == "strict + encrypted labels" and final["circuit_depth"] == 6
    assert final["test_accuracy"] >= 0.93, metrics["rounds"]
    assert f"test accuracy (encrypted, strict + encrypted labels): {final['test_accuracy']:.4f}" in out.out
    assert f"{tmp_path / 'run'}/summary.md\n" in out.out  # the tiled engine draws no plot, and says none
    assert final["polynomial_fits"]["layers[1]"]["max_error"] == pytest.approx(0.228, abs=1e-3)
    audit = [json.loads(line) for line in (tmp_path / "run" / "key_holder" / "audit.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in audit} == {"gradient"} and all(e["decision"] == "allow" for e in audit)
    assert metrics["final"]["polynomial_fits"]["loss_gradient"]["kind"] == "linear_sigmoid"
