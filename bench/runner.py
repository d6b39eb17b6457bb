"""`hetrain bench`: every workload against its baseline in one run; JSON plus a markdown report with plots."""

import json
import platform
import tempfile
import time
from pathlib import Path

import tenseal

from hetrain.core import store
from hetrain.mpc_ops.layers.planner import DEFAULT_COSTS, choose_ckks_params

from hetrain.bench import microbench, policies, report, workloads

SIZES = {
    # name: (tutorial/hetrain LR epochs, digits rounds, scaling n, scaling d, orchestration config, rounds)
    "full": dict(lr_epochs=3, digits_rounds=8, sizes=[4096, 16384, 65536], widths=[16, 64],
                 orch=("digits_vertical", 3),
                 policies=dict(epochs={"breast_cancer": 4, "digits_vertical": 3},
                               strict_batches={"digits_vertical": 6})),
    "quick": dict(lr_epochs=1, digits_rounds=3, sizes=[4096, 16384], widths=[16, 64],
                  orch=("digits_vertical", 2),
                  policies=dict(epochs={"breast_cancer": 2, "digits_vertical": 1},
                                strict_batches={"digits_vertical": 3})),
    "tiny": dict(lr_epochs=1, digits_rounds=1, sizes=[1024, 2048], widths=[16], orch=None,
                 policies=dict(epochs={"breast_cancer": 1}, strict_batches={"breast_cancer": 2},
                               datasets=("breast_cancer",))),
}


def run(mode: str, out: Path, work: Path | None = None, log=print) -> dict:
    """Run the benchmark at `mode` size; write out (JSON), out.md and PNG plots beside it."""
    size = SIZES[mode]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="hetrain-bench-") as tmp:
        work = Path(work or tmp)
        log("measuring per-op costs …")
        costs = {**DEFAULT_COSTS, **microbench.measure(repeat=5 if mode == "tiny" else 15)}
        log(f"LR: hetrain vs TenSEAL Tutorial-1 layout, {size['lr_epochs']} epoch(s) …")
        lr = workloads.lr_vs_tutorial(work / "lr", costs, size["lr_epochs"], tiny=(mode == "tiny"))
        log(f"digits_vertical vs its plaintext twin, {size['digits_rounds']} round(s) …")
        digits = workloads.digits_vs_twin(work / "digits", costs, size["digits_rounds"])
        log(f"scaling over n={size['sizes']}, d={size['widths']} …")
        scaling = workloads.scaling(work / "scaling", size["sizes"], size["widths"])
        orch = None
        if size["orch"]:
            log(f"orchestration overhead on {size['orch'][0]} …")
            orch = workloads.orchestration(work / "orch", *size["orch"])
        log("policies: strict, hybrid, hybrid + encrypted labels …")
        pol = policies.policies(work / "policies", log=log, **size["policies"])
        plans = {"lr": workloads.plan_table(work / "lr" / "lr.yaml", costs),
                 "digits": workloads.plan_table(work / "digits" / "digits.yaml", costs)}
    big = max(size["sizes"])
    result = {
        "mode": mode, "started": started, "seconds": round(time.time() - started, 1),
        "machine": {"python": platform.python_version(), "tenseal": tenseal.__version__,
                    "cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "speedup_vs_tutorial_layout": lr["speedup_vs_tutorial_layout"],
        "lr_test_accuracy": lr["lr_test_accuracy"],
        "tutorial_layout_test_accuracy": lr["tutorial_layout_test_accuracy"],
        "digits_seconds_to_95": digits["digits_seconds_to_95"],
        "digits_twin_accuracy_gap_points": digits["digits_twin_accuracy_gap_points"],
        "floor_ratio": lr["floor_ratio"],
        "orchestration_overhead_fraction": orch["orchestration_overhead_fraction"] if orch else None,
        "scaling_exponent": scaling["scaling_exponent"],
        f"peak_rss_mb_at_{big // 1000}k": scaling[f"peak_rss_mb_at_{big // 1000}k"],
        "peak_rss_ratio_largest_to_smallest": scaling["peak_rss_ratio"],
        "bytes_per_sample_feature": scaling["bytes_per_sample_feature"],
        "hybrid_vs_strict_time_ratio": pol["hybrid_vs_strict_time_ratio"],
        "hybrid_vs_strict_bytes_ratio": pol["hybrid_vs_strict_bytes_ratio"],
        "strict_accuracy_gap_points": pol["strict_accuracy_gap_points"],
        "hybrid_accuracy_gap_points": pol["hybrid_accuracy_gap_points"],
        "op_costs_seconds": costs,
        "workloads": {"lr": lr, "digits": digits, "scaling": scaling, "orchestration": orch, "policies": pol},
        "plans": plans,
        "ckks_choice": choose_ckks_params(30, 65536, max_sigma=0.5),
    }
    out = Path(out)
    store.write_json(out, result)
    report.write(result, out)
    return result


def main(quick: bool, out: str | None, tiny: bool = False) -> int:
    mode = "tiny" if tiny else "quick" if quick else "full"
    out_path = Path(out or f"bench/out/bench-{mode}.json")
    result = run(mode, out_path)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    return 0
