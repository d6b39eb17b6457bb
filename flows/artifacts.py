"""What a run leaves for people to look at: metrics.json, a plot, a summary, Prefect artifacts.

Prefect is imported only by the two publish_* functions, so a run without Prefect (hetrain.trainer's
PlainRunner) writes the same files without loading it."""

import base64
import io
import json
from pathlib import Path

from hetrain.core import store


def artifact_key(name: str, suffix: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    safe = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"{safe}-{suffix}"


def write_metrics(path: Path, rounds: list[dict], final: dict, lineage: dict | None = None) -> None:
    store.write_json(path, {"rounds": rounds, "final": final, "lineage": lineage})


def plot_png(rounds: list[dict], path: Path) -> Path | None:
    """Loss and accuracy per round, as a PNG."""
    if not rounds:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(xs, [r["loss"] for r in rounds], marker="o", label="train loss (hybrid)")
    ax1.set_xlabel("round"), ax1.set_ylabel("loss"), ax1.legend()
    ax2.plot(xs, [r["test_accuracy"] for r in rounds], marker="o", label="hybrid (encrypted)")
    if rounds[0].get("twin_test_accuracy") is not None:
        ax2.plot(xs, [r["twin_test_accuracy"] for r in rounds], linestyle="--", label="plaintext twin")
    ax2.set_xlabel("round"), ax2.set_ylabel("test accuracy"), ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    store.write_bytes(path, buf.getvalue())
    return path


def publish_round(name: str, rounds: list[dict], progress_id, total_rounds: int):
    """Per-round metrics table (stable key, so the UI shows versions) and the progress artifact."""
    from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

    create_table_artifact(key=artifact_key(name, "metrics"), table=rounds,
                          description=f"hetrain metrics per round for run '{name}'")
    pct = 100.0 * rounds[-1]["round"] / total_rounds
    if progress_id is None:
        return create_progress_artifact(progress=pct, key=artifact_key(name, "progress"),
                                        description="hetrain training progress (rounds)")
    update_progress_artifact(artifact_id=progress_id, progress=pct)
    return progress_id


def summary_markdown(name: str, final: dict, rounds: list[dict], policy: dict, owners: list[dict],
                     audit: dict, plot: Path | None, run_dir: Path, lineage: dict | None = None,
                     revealed: list[str] | None = None) -> str:
    """The run summary: results, policy decisions, what was revealed to whom, bytes moved (`revealed`: an
    engine's own rows of that table and notes, instead of the hybrid's)."""
    lines = [f"# hetrain run `{name}`", "", "## Result", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in final.items()]
    lines += ["", "## What was revealed to whom", "",
              "| to | what | rule |", "| --- | --- | --- |",
              *(revealed if revealed is not None else _hybrid_revealed(policy, audit)),
              "", "## Key holder decisions", "",
              "All runs under this key so far (every generation of the run directory); this run's own "
              f"decryptions: {final.get('decryptions_this_run', final.get('decryptions', 0))}.", "",
              f"- reveals allowed: {audit.get('allow', 0)}",
              f"- reveals refused: {audit.get('refuse', 0)} {audit.get('rules') or ''}",
              f"- decryptions used: {audit.get('decryptions_used', 0)} of budget {audit.get('budget', 0)}",
              "", "## Bytes moved", "",
              "| round | from owners | to key holder | from key holder |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['round']} | {r['bytes_from_owners']:,} | {r['bytes_to_key_holder']:,} | "
              f"{r['bytes_from_key_holder']:,} |" for r in rounds]
    lines += ["", "## Data owners", "", "| owner | ciphertexts | bytes | train rows | test rows | re-encrypted |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {o['owner']} | {o['ciphertexts']} | {o['bytes']:,} | {o['n_train']} | {o['n_test']} | "
              f"{'no (reused)' if o['reused'] else 'yes'} |" for o in owners]
    lines += ["", f"Run directory: `{run_dir}`"]
    lines += _lineage_section(lineage)
    if plot is not None:
        encoded = base64.b64encode(plot.read_bytes()).decode()
        lines += ["", "## Training curves", "", f"![loss and accuracy](data:image/png;base64,{encoded})",
                  "", f"(also at `{plot}`)"]
    return "\n".join(lines) + "\n"


def _hybrid_revealed(policy: dict, audit: dict) -> list[str]:
    return [f"| trainer | first-layer activations X·W (blinded, flooded σ≈{audit.get('sigma', 0):.2g}) | "
            f"policy.reveals: {json.dumps(policy['reveals'])} |",
            f"| trainer | weight gradients X^T·δ summed over ≥ {policy['min_batch']} samples | policy.min_batch |",
            "| trainer | labels, in plaintext | policy.labels: reveal |",
            "| key holder | masked values only (uniform mask of bound "
            f"{policy['mask_bound']}), never true activations | blinding |",
            *_rank_note(audit)]


def _lineage_section(lineage: dict | None) -> list[str]:
    """Config, data, key, parent and produced checkpoint, with digests (`hetrain lineage` walks them)."""
    if not lineage:
        return []
    parent = lineage.get("parent_checkpoint")
    rows = [("config", f"`{lineage['config_path']}` sha256 `{lineage['config_sha256']}`"),
            ("key id", f"`{lineage['key_id']}`"),
            *[(f"owner {owner}", f"manifest sha256 `{digest}`")
              for owner, digest in sorted(lineage.get("manifest_sha256", {}).items())],
            *([("exchange store", f"`{lineage['exchange']}`")] if lineage.get("exchange") else []),
            ("parent checkpoint", f"`{parent}` sha256 `{lineage['parent_checkpoint_sha256']}`" if parent
             else "none (fresh start)"),
            ("final checkpoint", f"`{lineage['checkpoint']}` sha256 `{lineage['checkpoint_sha256']}`"),
            ("generation", str(lineage.get("generation") or "none")),
            ("Prefect flow run", f"`{lineage.get('flow_run_id')}`"),
            ("Prefect deployment", f"`{lineage.get('deployment_id')}`" if lineage.get("deployment_id") else "none")]
    return ["", "## Lineage", "", "| what | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows]]


def _rank_note(audit: dict) -> list[str]:
    """Per ciphertext layer, from the key holder's reveal ledger: the most feature combinations the
    trainer holds of any one sample, against the limit and d; and the DP ε spent, if DP is on."""
    lines = []
    for layer, led in (audit.get("ledger") or {}).items():
        limit = led["rank_limit"]
        lines += ["", f"Layer `{layer}`: the trainer holds at most {led['max_rank_bound']} noisy linear "
                      f"combinations of any sample's {led['in_features']} features ({led['max_distinct_weights']} "
                      f"distinct weights × out_features), against a limit of "
                      f"{limit if limit is not None else 'none (allow_invertible)'}, enforced by the key holder."]
        if led["dp_epsilon"] is not None:
            lines += [f"Its weight gradients were released with DP noise: each sample took part in at most "
                      f"{led['max_gradient_releases']} releases, (ε, δ) = ({led['dp_epsilon']}, {led['dp_delta']})."]
    return lines


def publish_summary(name: str, markdown: str, path: Path) -> None:
    from prefect.artifacts import create_markdown_artifact

    store.write_bytes(path, markdown.encode())
    create_markdown_artifact(key=artifact_key(name, "summary"), markdown=markdown,
                             description=f"hetrain run summary for '{name}'")
