"""The `hetrain` command line: train, serve, lineage, bench (and its fault-injection mode), audit,
rotate-key, key-holder (serve, token), demo-data."""

import argparse
import sys
from pathlib import Path

from hetrain.prefect_settings import quiet_prefect as _quiet_prefect


def _fail(message: str, code: int = 2) -> int:
    print(f"hetrain: error: {message}", file=sys.stderr)
    return code


def cmd_demo_data(args) -> int:
    from hetrain.participants.demo_data import write_demo_data

    paths = write_demo_data(Path(args.out))
    print(f"wrote {len(paths)} demo tables under {Path(args.out).resolve()}:")
    for p in paths:
        print(f"  {p}")
    return 0


def cmd_audit(args) -> int:
    from hetrain.core.errors import HetrainError
    from hetrain.participants.audit import verify

    key_dir = Path(args.run_dir) / "key_holder"
    logs = [key_dir] if (key_dir / "state.json").exists() else []
    logs += sorted(p for p in (key_dir / "retired").glob("*") if p.is_dir())
    if not logs:
        return _fail(f"{key_dir} holds no key holder state (state.json); is {args.run_dir} a run directory?", 1)
    for directory in logs:
        try:
            report = verify(directory)
        except HetrainError as exc:
            return _fail(f"{type(exc).__name__}: {exc}", code=1)
        which = "current key" if directory == key_dir else f"retired key {directory.name}"
        print(f"{which}: audit log verified, {report.entries} entries ({report.allowed} allowed, "
              f"{report.refused} refused), head {report.head[:16]}…")
    return 0


def cmd_rotate_key(args) -> int:
    from hetrain.core.errors import HetrainError
    from hetrain.participants.key_holder import KeyHolder

    try:
        retired = KeyHolder.rotate(Path(args.run_dir) / "key_holder")
    except HetrainError as exc:
        return _fail(f"{type(exc).__name__}: {exc}", code=1)
    print(f"retired key {retired}: its secret key is deleted, its audit log kept under key_holder/retired/.")
    print(f"the next `hetrain train CONFIG --run-dir {args.run_dir} --resume` makes a new key, and every owner "
          f"re-encrypts under it")
    return 0


def cmd_key_holder(args) -> int:
    from hetrain.core.errors import HetrainError

    if args.action == "token":
        from hetrain.mpc_ops.reveal.token_file import create_token, read_token

        try:
            created = create_token(args.file)
            read_token(args.file)
        except (HetrainError, OSError) as exc:
            return _fail(f"{type(exc).__name__}: {exc}", code=1)
        path = Path(args.file).resolve()
        print(f"{'wrote a new' if created else 'kept the existing'} bearer token in {path} (mode 0600); pass it to "
              f"`hetrain key-holder serve --token-file {path}` and to the trainer as key_holder.token_file")
        return 0
    from hetrain.configure import load_config
    from hetrain.participants.key_holder_service import check_serve_options, serve

    options = {"port": args.port, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
               "tls_client_ca": args.tls_client_ca, "max_body_mb": args.max_body_mb}
    try:
        check_serve_options(**options)  # before the config: a bad option is reported even without one
        cfg, config_path = load_config(args.config)
        if cfg.policy.trainer == "untrusted":
            return _fail(f"{args.config}: policy.trainer: untrusted runs with the in-process key holder in this "
                         f"version; the key-holder service has no verified-reveal endpoint yet", code=2)
        return serve(cfg, config_path, args.key_dir, host=args.host, token_path=args.token_file, **options)
    except HetrainError as exc:
        return _fail(f"{type(exc).__name__}: {exc}", code=1)


def cmd_bench(args) -> int:
    _quiet_prefect(False)
    if args.faults:
        try:
            from hetrain.bench.harness.faults import main as faults_main
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("hetrain.bench.harness"):
                raise
            return _fail("the fault harness (bench/harness/) is test infrastructure and is not in the installed "
                         "package; run `hetrain bench --faults` from a clone of the repository "
                         "(pip install -e '.[test]')", code=1)

        return faults_main(args.out)
    if args.leakage:
        from hetrain.bench.leakage.harness import main as leakage_main

        return leakage_main(args.out)
    from hetrain.bench.runner import main as bench_main

    return bench_main(args.quick, args.out, tiny=args.tiny)


def cmd_train(args) -> int:
    from hetrain.api import load_config, train
    from hetrain.core.errors import HetrainError

    try:
        cfg = load_config(args.config)
        deployed = [o.name for o in cfg.data.owners if o.deployment]
        if deployed:
            from hetrain.serve import check_api_url
            check_api_url(f"owners {deployed} run as their own deployments, which need")
    except HetrainError as exc:
        return _fail(str(exc))
    run_dir = Path(args.run_dir or f"runs/{cfg.name}").resolve()

    from hetrain.artifacts import artifact_key

    try:
        result = train(args.config, run_dir, resume=args.resume, retrain=args.retrain, progress=True,
                       verbose=args.verbose)
    except HetrainError as exc:
        return _fail(f"{type(exc).__name__}: {exc}", code=1)
    except OSError as exc:  # a full disk, a lost mount: the run stops, its checkpoints stay usable
        return _fail(_io_failure(exc, run_dir), code=1)
    out = result.out_dir
    print()
    print(f"hetrain: run '{cfg.name}' finished ({result.stop_reason})")
    mode = f"encrypted, {result.policy_mode}"
    width = max(len(mode), len("plaintext twin"))
    print(f"  test accuracy ({mode}):{' ' * (width - len(mode))} {result.test_accuracy:.4f}")
    if result.twin_test_accuracy is not None:
        print(f"  test accuracy (plaintext twin):{' ' * (width - 14)} {result.twin_test_accuracy:.4f}")
    print(f"  decryptions: {result.decryptions}, policy refusals: {result.policy_refusals}, "
          f"seconds/round: {result.mean_seconds_per_round}, bytes/round: {result.mean_bytes_per_round:,}")
    if result.generation is not None:
        parent = result.lineage["parent_checkpoint"]
        print(f"  generation {result.generation} of {run_dir} ({f'warm start from {parent}' if parent else 'fresh start'})")
    plot = f", {result.plot_path}" if result.plot_path else ""
    print(f"  results:  {out}/metrics.json, {out}/summary.md{plot}")
    print("  Prefect UI: the runs are stored in Prefect's local database; to browse them run")
    print(f"    {_prefect_bin()} server start")
    print("  and open http://127.0.0.1:4200/runs (flow 'train', run "
          f"'{cfg.name}', artifacts '{artifact_key(cfg.name, 'metrics')}' and "
          f"'{artifact_key(cfg.name, 'summary')}').")
    return 0


def _io_failure(exc: OSError, run_dir: Path) -> str:
    """One line for an I/O failure: what failed, and which checkpoint a --resume continues from."""
    from hetrain.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir / "checkpoints")
    where = f"the newest complete checkpoint is {latest.name}" if latest else "no round was checkpointed yet"
    return (f"{type(exc).__name__}: {exc}; the run stopped and {where}. Fix the cause (e.g. free disk space), "
            f"then rerun with --resume")


def cmd_serve(args) -> int:
    from hetrain.configure import load_config
    from hetrain.core.errors import HetrainError

    from hetrain.serve import arm_stop_watchdog, check_api_url, check_cron, serve

    try:
        cfg, config_path = load_config(args.config)
        check_cron(args.cron)
        url = check_api_url()
    except HetrainError as exc:
        return _fail(str(exc))
    run_dir = Path(args.run_dir or f"runs/{cfg.name}").resolve()
    name = args.name or cfg.name
    print(f"hetrain: serving train/{name} on {url} (cron {args.cron!r}); each run is a new generation of {run_dir}")
    print("  press Ctrl-C to stop (the schedule is paused when serving stops)")
    arm_stop_watchdog(f"train/{name}", f"hetrain: stopped serving train/{name}")
    try:
        serve(config_path, run_dir, name, args.cron, cfg.name)
    except KeyboardInterrupt:
        pass
    print(f"hetrain: stopped serving train/{name}")
    return 0


def cmd_lineage(args) -> int:
    import json

    from hetrain.core.errors import HetrainError

    from hetrain.lineage import chain, format_chain, newest_checkpoint

    target = Path(args.run_dir)
    start = target if (target / "state.json").is_file() else newest_checkpoint(target)
    if start is None:
        return _fail(f"{target} holds no complete checkpoint (checkpoints/round-* or generations/*/checkpoints/"
                     f"round-*); is it a run directory?", 1)
    try:
        records = chain(start)
    except HetrainError as exc:
        return _fail(f"{type(exc).__name__}: {exc}", code=1)
    if args.json:
        print(json.dumps({"start": str(start.resolve()), "chain": records}, indent=2))
    else:
        print(f"lineage of {start.resolve()} (newest first, {len(records)} checkpoints)")
        print(format_chain(records))
    return 0


def _prefect_bin() -> str:
    candidate = Path(sys.executable).parent / "prefect"
    return str(candidate) if candidate.exists() else "prefect"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetrain", description="Hybrid ciphertext/plaintext training on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="path to the YAML config, e.g. configs/breast_cancer.yaml")
    p.add_argument("--run-dir", help="where keys, bundles, checkpoints and metrics go (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--retrain", action="store_true",
                   help="a new generation of DIR that reuses its key and unchanged owners' bundles, warm-started "
                        "from the newest checkpoint if train.warm_start is true (with --resume: continue the newest)")
    p.add_argument("--verbose", action="store_true", help="also print Prefect's own logs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="retrain on a cron schedule with flow.serve (needs a running Prefect server)")
    p.add_argument("config", help="path to the YAML config")
    p.add_argument("--cron", required=True, help="five-field cron schedule, e.g. '0 3 * * *'")
    p.add_argument("--run-dir", help="the stable run directory each run adds a generation to (default runs/<name>)")
    p.add_argument("--name", help="the deployment name (default: the config's name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("lineage", help="print a run's checkpoint chain, newest first, following parents")
    p.add_argument("run_dir", help="a run directory (its newest checkpoint across generations) or a checkpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("bench", help="measure hetrain against its baselines; writes JSON and a markdown report")
    p.add_argument("--quick", action="store_true", help="smaller workloads (a few minutes on 2 cores)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (used by the test suite)")
    p.add_argument("--faults", action="store_true",
                   help="fault injection instead: SIGKILL, a full disk and corrupt manifests, each resumed and "
                        "checked for data loss and torn checkpoints (docs/SECURITY.md)")
    p.add_argument("--leakage", action="store_true",
                   help="privacy instead: attack the key holder as a deviating trainer, and measure what an honest "
                        "trainer can reconstruct, per trainer mode (docs/SECURITY.md)")
    p.add_argument("--out", help="JSON path (default bench/out/bench-<mode>.json, bench/out/faults.json with "
                                 "--faults, bench/out/leakage.json with --leakage); the .md (and PNGs) go beside it")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("audit", help="check the key holder's hash-chained audit log")
    p.add_argument("action", choices=["verify"], help="verify: walk the hash chain")
    p.add_argument("run_dir", help="the run directory whose key_holder/audit.jsonl to check")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("rotate-key", help="retire the run's key; the next --resume makes a new one")
    p.add_argument("run_dir", help="the run directory whose key_holder/ key to retire")
    p.set_defaults(func=cmd_rotate_key)

    p = sub.add_parser("key-holder", help="run the key holder as its own service (the only process with the secret key)")
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("serve", help="serve the reveal API for one config and key directory")
    s.add_argument("config", help="the run's YAML config: policy, layer shapes and CKKS parameters come from it")
    s.add_argument("--key-dir", required=True, help="where the secret key, budget and audit log live (made if new)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    s.add_argument("--token-file", help="bearer token file, mode 0600; made if missing (default KEY_DIR/service.token)")
    s.add_argument("--tls-cert", help="the service's TLS certificate (PEM); serves https")
    s.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    s.add_argument("--tls-client-ca", help="CA bundle (PEM) that client certificates must chain to (mutual TLS)")
    s.add_argument("--max-body-mb", type=float,
                   help="largest reveal body in MiB (default: the config's largest reveal, from the CKKS parameters)")
    t = actions.add_parser("token", help="write a fresh bearer token file (mode 0600) unless it exists")
    t.add_argument("file", help="where to write the token")
    p.set_defaults(func=cmd_key_holder)

    p = sub.add_parser("demo-data", help="write the bundled demo tables (one CSV per data owner)")
    p.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    p.set_defaults(func=cmd_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
