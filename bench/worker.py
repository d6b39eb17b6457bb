"""One benchmark measurement in a fresh process: prints one JSON line (peak RSS is this process's)."""

import json
import shutil
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(mode: str, config: str, run_dir: str) -> dict:
    if mode == "orchestration":  # Prefect reads its settings from the environment at import
        import os

        from hetrain.prefect_settings import QUIET_PREFECT

        for key, value in QUIET_PREFECT.items():
            os.environ.setdefault(key, value)
    from hetrain.bench import pipeline

    if mode == "prepare":
        prep = pipeline.prepare(Path(config), Path(run_dir))
        return {"seconds": round(prep["prepare_seconds"], 3), "forward_layout": prep["forward_layout"],
                "peak_rss_mb": peak_rss_mb()}
    if mode == "train":
        # two epochs: the second is the steady state (the first also pays one-time start-up costs)
        first, row = pipeline.rounds(Path(config), Path(run_dir), 1, 2)
        keys = ("train_seconds", "seconds", "bytes_from_owners", "bytes_to_key_holder", "bytes_from_key_holder",
                "decryptions", "test_accuracy")
        return {**{k: row[k] for k in keys}, "first_epoch_train_seconds": first["train_seconds"],
                "peak_rss_mb": peak_rss_mb()}
    if mode == "orchestration":
        return orchestration(Path(config), Path(run_dir))
    raise SystemExit(f"unknown mode {mode!r}; allowed: prepare, train, orchestration")


def orchestration(config: Path, run_dir: Path) -> dict:
    from prefect import flow

    from hetrain.bench import pipeline
    from hetrain.runtime import Runtime
    from hetrain.train_flow import child_flow_settings, training_round
    from hetrain.mpc_ops.crypto.jobs import JobRunner

    rounds = Runtime(config, run_dir / "engine").cfg.train.rounds
    pipeline.prepare(config, run_dir / "engine")
    rt = Runtime(config, run_dir / "engine")
    JobRunner(rt.context, rt.plan.slots, rt.cfg.train.workers).warm_up()  # both sides share warm workers
    shutil.rmtree(run_dir / "plain", ignore_errors=True)
    shutil.copytree(run_dir / "engine", run_dir / "plain")

    @flow(name="bench-orchestration")
    def with_engine() -> tuple[list[float], list[float]]:
        times, inner = [], []
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            with child_flow_settings():
                row = training_round(str(config), str(run_dir / "engine"), r)
            times.append(time.perf_counter() - start)
            inner.append(row["seconds"])
        return times, inner

    engine, inner = with_engine()
    plain, plain_inner = [], []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        row = pipeline.rounds(config, run_dir / "plain", r, r)[0]
        plain.append(time.perf_counter() - start)
        plain_inner.append(row["seconds"])
    return {"rounds": rounds, "engine_round_seconds": [round(t, 3) for t in engine],
            "plain_round_seconds": [round(t, 3) for t in plain],
            "engine_inner_seconds": inner, "plain_inner_seconds": plain_inner,
            "engine_seconds": round(sum(engine), 3), "plain_seconds": round(sum(plain), 3)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
