"""The fault harness's readable report: one markdown page beside the JSON."""

from pathlib import Path

from hetrain.core import store

DONE_WHEN = [
    ("faults_injected >= 20", lambda r: r["faults_injected"] >= 20),
    ("faults_recovered == faults_injected", lambda r: r["faults_recovered"] == r["faults_injected"]),
    ("runs_with_data_loss == 0", lambda r: r["runs_with_data_loss"] == 0),
    ("torn_checkpoints_read == 0", lambda r: r["torn_checkpoints_read"] == 0),
    ("segfaults == 0", lambda r: r["segfaults"] == 0),
]


def _acc(record: dict) -> str:
    if "resumed_test_accuracy" not in record:
        return "–"
    twin = "twin =" if record["twin_identical"] else "**twin ≠**"
    return (f"{record['resumed_test_accuracy']:.4f} vs {record['uninterrupted_test_accuracy']:.4f} "
            f"({twin})")


def _row(i: int, r: dict) -> str:
    point = r["kill_point"].replace("|", "\\|")
    problems = "; ".join(p for v in r.get("problems", {}).values() for p in v)[:160]
    outcome = "yes" if r.get("recovered") else f"**no** {problems or r.get('note', '')}"
    if not r["injected"]:
        outcome = f"not injected: {r.get('note', '')}"
    first = r.get("first", {})
    resume = r.get("resume", {})
    where = r["where"] if r.get("trigger") == "failpoint" and r.get("where") else r.get("phase", "")
    loss = "**yes**" if r.get("data_loss") else "no"
    return (f"| {i} | {r['kind']} | `{point}` | {where} | {_acc(r)} | {outcome} | {loss} | "
            f"{first.get('seconds', '–')} + {resume.get('seconds', '–')} |")


def markdown(result: dict) -> str:
    ref, cost = result["reference"], result["failpoint_cost"]
    lines = [
        "# hetrain fault injection (`hetrain bench --faults`)", "",
        f"{result['faults_injected']} faults injected into real `hetrain train` processes "
        f"({result['kill_resume_runs']} SIGKILL + `--resume` runs), each resumed as a user would and then checked; "
        f"{result['seconds']:.0f} s in all on {result['machine']['cpus']} cores "
        f"({result['config']['parallel_fault_runs']} fault runs at a time, one shared `prefect server`).", "",
        "| figure | value |", "| --- | --- |",
    ]
    for key in ("faults_injected", "faults_recovered", "runs_with_data_loss", "torn_checkpoints_read", "segfaults",
                "bad_inputs_tried", "bad_inputs_rejected_cleanly", "distinct_bad_inputs"):
        value = result[key]
        lines.append(f"| `{key}` | {'null' if value is None else value} |")
    verdicts = ", ".join(f"{name} {'✔' if check(result) else '✘'}" for name, check in DONE_WHEN)
    lines += ["", f"Done-when: {verdicts}", ""]
    if result["hostile_inputs"].get("note"):
        lines += [f"Hostile inputs: {result['hostile_inputs']['note']} (the `bad_inputs_*` keys are null).", ""]
    lines += [
        "## Determinism", "",
        f"The uninterrupted run ({result['config']['rounds']} rounds, seed {result['config']['seed']}) reached test "
        f"accuracy {ref['test_accuracy']:.4f}; a second uninterrupted run reached "
        f"{ref['second_run_test_accuracy']:.4f}, "
        f"and their final ciphertext-layer weights differ by {ref['weight_gap_between_two_uninterrupted_runs']:.2%} "
        "of the largest weight. The encrypted hybrid is not bit-reproducible, resumed or not: the blinding masks, "
        "the key holder's flooding noise and CKKS's encryption randomness come from `os.urandom` by design, and a "
        "kill mid-upload also re-encrypts. Resumed runs are therefore compared on test accuracy within "
        f"±{result['tolerance']['test_accuracy_abs']} (about 3 of 111 test samples). The plaintext twin, which shares "
        "the restored weights, optimizer state, batch order and initialisation but no randomness, must match the "
        "uninterrupted run exactly, and does where the table says `twin =`.", "",
        "## Faults", "",
        "| # | kind | point | where it hit | test accuracy: resumed vs uninterrupted | recovered | data loss "
        "| seconds (faulty + resume) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [_row(i, r) for i, r in enumerate(result["faults"], start=1)]
    if result["not_run"]:
        lines += ["", "Not run (not counted in the totals):", ""]
        lines += [f"- **{r['kind']}** (`{r['name']}`): {r['note']}" for r in result["not_run"]]
    lines += [
        "", "## Checks after every fault", "",
        "- every checkpoint `round-00001` … `round-NNNNN` is present, holds exactly its three files, and each file "
        "matches its digest; `state.json` matches its own digest; each names its parent;",
        "- `torn_checkpoints_read`: each checkpoint the resumed process read (the parent of every round it wrote) "
        "verifies and is byte-for-byte the one its lineage records (`parent_state_sha256`);",
        "- data loss: a checkpoint complete before the resume changed or vanished, the audit log lost an entry or "
        "does not verify (`hetrain.participants.audit.verify` and `hetrain audit verify RUN`), `metrics.json` does not list "
        "rounds 1..n exactly once, or a manifest or blob in the exchange store does not verify;",
        "- the full disk must stop the run with one `hetrain: error:` line and no traceback, keep the previous "
        "checkpoint loadable and leave no temporary directory; a corrupt manifest must be refused by the trainer "
        "with a named error (`BundleError`, `DigestMismatch`);",
        "- the unreachable key holder: the trainer runs against `hetrain key-holder serve` in its own process, which "
        "is SIGKILLed after round 1's checkpoint; the trainer must use all its `key_holder.retries` and stop with one "
        "`hetrain: error: KeyHolderUnreachable` line naming the `--resume` command and no traceback; the checkpoints, "
        "the exchange store and the service's audit log (`hetrain.participants.audit.verify` on its `--key-dir`) must be "
        "intact; the service is then started again on the same key directory and port and the run resumed.", "",
        f"Failpoint cost with `HETRAIN_FAILPOINTS` unset: {cost['ns_per_call_unset']} ns a call (an empty lambda: "
        f"{cost['ns_per_empty_lambda']} ns), {cost['hits_per_round']} calls per {cost['round_seconds']} s round: "
        f"{cost['fraction_of_round']:.1g} of the round.", "",
    ]
    return "\n".join(lines)


def write(result: dict, out: Path) -> Path:
    path = Path(out).with_suffix(".md")
    store.write_bytes(path, markdown(result).encode())
    return path
