"""`hetrain bench` at its tiny size: every workload runs and the JSON is well-formed (figures are
benchmark output, not asserted as timings: this machine is shared and noisy)."""

import json

import pytest

pytestmark = pytest.mark.e2e  # runs every benchmark workload

REQUIRED = {
    "speedup_vs_tutorial_layout": (int, float), "lr_test_accuracy": float, "tutorial_layout_test_accuracy": float,
    "digits_twin_accuracy_gap_points": (int, float), "floor_ratio": float, "scaling_exponent": float,
    "bytes_per_sample_feature": (int, float),
    "hybrid_vs_strict_time_ratio": (int, float), "hybrid_vs_strict_bytes_ratio": (int, float),
    "strict_accuracy_gap_points": (int, float), "hybrid_accuracy_gap_points": (int, float),
}


@pytest.mark.slow
def test_tiny_benchmark_writes_well_formed_json_a_report_and_plots(tmp_path, capsys):
    # Prepare
    from hetrain.cli import main

    out = tmp_path / "bench.json"
    # Execute
    code = main(["bench", "--tiny", "--out", str(out)])
    # Assert
    assert code == 0
    result = json.loads(out.read_text())
    for key, kind in REQUIRED.items():
        assert isinstance(result[key], kind), (key, result[key])
    assert result["mode"] == "tiny"
    assert 0.0 <= result["lr_test_accuracy"] <= 1.0
    assert result["speedup_vs_tutorial_layout"] > 0 and result["floor_ratio"] > 0
    assert "digits_seconds_to_95" in result and "orchestration_overhead_fraction" in result
    assert {"mul_plain", "rotate", "decrypt"} <= set(result["op_costs_seconds"])
    assert any(row["chosen"] for row in result["plans"]["lr"])
    rows = result["workloads"]["policies"]["rows"]["breast_cancer"]
    assert set(rows) == {"strict", "hybrid", "hybrid_encrypted_labels"}
    assert all(r["seconds_per_round"] > 0 and r["bytes_per_round"] > 0 for r in rows.values())
    report = out.with_suffix(".md").read_text()
    assert report.startswith("# hetrain benchmark (tiny)") and "| workload | setting | measured |" in report
    for suffix in ("lr", "scaling", "digits"):
        assert (tmp_path / f"bench-{suffix}.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out
