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
    from hetrain.train_flow import PrefectRunner, child_flow_settings, live_trainer, training_round

    pipeline.prepare(config, run_dir / "engine")
    shutil.rmtree(run_dir / "plain", ignore_errors=True)
    shutil.copytree(run_dir / "engine", run_dir / "plain")
    engine_side = pipeline.open_trainer(config, run_dir / "engine")
    plain_side = pipeline.open_trainer(config, run_dir / "plain")
    rounds = engine_side.cfg.train.rounds
    engine_side.engine.hybrid.front.runner.warm_up()  # both sides start with warm workers
    plain_side.engine.hybrid.front.runner.warm_up()

    @flow(name="bench-orchestration")
    def with_engine() -> tuple[list[float], list[float]]:
        times, inner = [], []
        with live_trainer(engine_side) as token:
            engine_side.runner = PrefectRunner(token)
            for r in range(1, rounds + 1):
                start = time.perf_counter()
                with child_flow_settings():
                    row = training_round(token, r)
                times.append(time.perf_counter() - start)
                inner.append(row["seconds"])
        return times, inner

    engine, inner = with_engine()
    plain, plain_inner = [], []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        row = plain_side.run_round(r)
        plain.append(time.perf_counter() - start)
        plain_inner.append(row["seconds"])
    return {"rounds": rounds, "engine_round_seconds": [round(t, 3) for t in engine],
            "plain_round_seconds": [round(t, 3) for t in plain],
            "engine_inner_seconds": inner, "plain_inner_seconds": plain_inner,
            "engine_seconds": round(sum(engine), 3), "plain_seconds": round(sum(plain), 3)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
