"""The hostile-input benchmark: every named bad input and random mutation is refused cleanly, none crashes."""

import pytest

from hetrain.bench.harness.hostile import run_bad_inputs

pytestmark = pytest.mark.e2e  # the hostile-input benchmark, loader subprocesses


@pytest.mark.slow
def test_run_bad_inputs_rejects_every_bad_input_cleanly_without_a_crash(tmp_path):
    # Execute
    report = run_bad_inputs(tmp_path, fuzz_examples=22, seed=1)

    # Assert
    unclean = [f"{c['name']} [{c['loader']}]: {c['outcome']} {c['message']}" for c in report["cases"]
               if not c["clean"] and c["outcome"] != "equivalent"]
    assert not unclean, "\n".join(unclean)
    assert report["bad_inputs_rejected_cleanly"] == report["bad_inputs_tried"]
    assert report["distinct_bad_inputs"] >= 30
    assert report["segfaults"] == 0
    assert report["bad_inputs_tried"] >= report["distinct_bad_inputs"] + 22 - report["equivalent_mutations"]
    names = {c["name"] for c in report["cases"]}
    assert {"blob_truncated", "blob_wrong_level", "context_private_key_in_exchange", "manifest_path_escape",
            "checkpoint_truncated", "config_unknown_key", "reveal_stride_overflow", "audit_line_edited"} <= names
    assert all(set(c) >= {"name", "loader", "rejected_with", "clean"} for c in report["cases"])
