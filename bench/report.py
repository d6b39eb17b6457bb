"""The benchmark's readable report: a markdown page with tables and PNG plots beside the JSON."""

from pathlib import Path

from hetrain.core import store


def _plots(result: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    lr = result["workloads"]["lr"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(["TenSEAL Tutorial-1 layout", "hetrain (packed)"],
           [lr["tutorial_layout_seconds_per_epoch"], lr["hetrain_seconds_per_epoch"]], color=["#999", "#2a7"])
    ax.set_yscale("log"), ax.set_ylabel("seconds per epoch (log)")
    ax.set_title(f"LR on breast cancer: {lr['speedup_vs_tutorial_layout']}× faster")
    fig.tight_layout()
    paths.append(out.with_name(out.stem + "-lr.png"))
    fig.savefig(paths[-1], dpi=110), plt.close(fig)

    points = result["workloads"]["scaling"]["points"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.3))
    for d in sorted({p["d"] for p in points}):
        pts = [p for p in points if p["d"] == d]
        ax1.loglog([p["n"] for p in pts], [p["train_seconds"] for p in pts], marker="o", label=f"d={d}")
        ax2.plot([p["n"] for p in pts], [p["peak_rss_mb"] for p in pts], marker="o", label=f"d={d}")
    sizes = sorted({p["n"] for p in points})
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n // 1024}k" for n in sizes])
        ax.minorticks_off()
    ax1.set_xlabel("samples n"), ax1.set_ylabel("seconds per epoch"), ax1.legend()
    ax2.set_xlabel("samples n"), ax2.set_ylabel("peak RSS (MB)"), ax2.legend()
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    paths.append(out.with_name(out.stem + "-scaling.png"))
    fig.savefig(paths[-1], dpi=110), plt.close(fig)

    digits = result["workloads"]["digits"]
    fig, ax = plt.subplots(figsize=(5, 3))
    xs = list(range(1, len(digits["accuracy_per_round"]) + 1))
    ax.plot(xs, digits["accuracy_per_round"], marker="o", label="hybrid (encrypted)")
    ax.plot(xs, digits["twin_accuracy_per_round"], linestyle="--", label="plaintext twin")
    ax.axhline(0.95, color="#c33", linewidth=0.8)
    ax.set_xlabel("round (epoch)"), ax.set_ylabel("test accuracy"), ax.legend()
    fig.tight_layout()
    paths.append(out.with_name(out.stem + "-digits.png"))
    fig.savefig(paths[-1], dpi=110), plt.close(fig)
    return paths


def table(result: dict) -> str:
    """The headline table: workload, setting, measured figure."""
    w = result["workloads"]
    lr, dg, sc, orch = w["lr"], w["digits"], w["scaling"], w["orchestration"]
    big = max(p["n"] for p in sc["points"])
    rows = [
        ("LR vs Tutorial-1 layout", f"breast cancer, {lr['n_train']} train rows, {lr['epochs']} epoch(s)",
         f"{lr['tutorial_layout_seconds_per_epoch']} s → {lr['hetrain_seconds_per_epoch']} s per epoch: "
         f"**{lr['speedup_vs_tutorial_layout']}×**"),
        ("LR accuracy", "same standardised split", f"hetrain {lr['lr_test_accuracy']:.3f}, "
         f"tutorial layout {lr['tutorial_layout_test_accuracy']:.3f}"),
        ("LR encryption", "all training rows", f"hetrain {lr['hetrain_encrypt_seconds']} s, "
         f"tutorial layout {lr['tutorial_layout_encrypt_seconds']} s"),
        ("floor ratio (LR)", f"{lr['hetrain_forward_layout']} forward, cols gradient",
         f"{lr['floor_ratio']} (measured ÷ op-count floor)"),
        ("digits vs twin", f"64→32 ciphertext, {dg['rounds']} rounds",
         f"{dg['seconds_per_epoch']} s/epoch, acc {dg['test_accuracy']:.3f} vs twin {dg['twin_test_accuracy']:.3f} "
         f"(gap {dg['digits_twin_accuracy_gap_points']} pts)"),
        ("digits time to 0.95", "wall time of rounds", f"{dg['digits_seconds_to_95']} s"),
        ("floor ratio (digits)", f"{dg['forward_layout']} forward, cols gradient", f"{dg['floor_ratio']}"),
        ("scaling", f"n ∈ {sorted({p['n'] for p in sc['points']})}, d ∈ {sorted({p['d'] for p in sc['points']})}",
         f"exponent {sc['scaling_exponent']} ({sc['scaling_exponent_by_d']})"),
        ("peak RSS", f"n={big} vs smallest", f"{sc[f'peak_rss_mb_at_{big // 1000}k']} MB "
         f"(ratio {sc['peak_rss_ratio']})"),
        ("bytes per sample·feature", "exchange store → trainer, one round", f"{sc['bytes_per_sample_feature']}"),
    ]
    if orch:
        rows.append(("orchestration overhead", f"{orch['rounds']} rounds with vs without Prefect",
                     f"{orch['orchestration_overhead_fraction']:.3f} ({orch['engine_seconds']} s vs "
                     f"{orch['plain_seconds']} s)"))
    lines = ["| workload | setting | measured |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + policy_table(w.get("policies"))


def policy_table(pol: dict | None) -> str:
    """One row per data set and policy: s/round, bytes/round, decryptions/round, accuracy vs twin."""
    if not pol:
        return ""
    lines = ["", "", f"### Policies (same model and epochs; headline ratios on {pol['headline_dataset']}: time "
             f"{pol['hybrid_vs_strict_time_ratio']}×, bytes {pol['hybrid_vs_strict_bytes_ratio']}×)", "",
             "| data | policy | s/round | MB/round | decryptions/round | test acc | twin acc | batches/round |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for base, rows in pol["rows"].items():
        for name, r in rows.items():
            lines.append(f"| {base} | {name} | {r['seconds_per_round']} | {r['bytes_per_round'] / 1e6:.1f} | "
                         f"{r['decryptions_per_round']} | {r['test_accuracy']} | {r['twin_test_accuracy']} | "
                         f"{r['batches_per_round'] or 'all'} |")
    return "\n".join(lines)


def write(result: dict, out: Path) -> Path:
    plots = _plots(result, out)
    costs = result["op_costs_seconds"]
    lines = [f"# hetrain benchmark ({result['mode']})", "",
             f"Machine: {result['machine']['cpus']} CPUs, Python {result['machine']['python']}, "
             f"TenSEAL {result['machine']['tenseal']}. Total {result['seconds']} s. "
             "Every ratio below was measured side by side in this one run.", "", table(result), "",
             "## Per-op costs measured in this run (ms)", "", "| op | ms |", "| --- | --- |"]
    lines += [f"| {k} | {v * 1000:.3f} |" for k, v in sorted(costs.items())]
    for name, rows in result["plans"].items():
        lines += ["", f"## Planner candidates for `{name}` (predicted seconds per training batch)", "",
                  "| forward | gradient | executable | predicted s | chosen |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['forward']} | {r['gradient']} | {r['executable']} | {r['predicted_seconds_per_batch']} | "
                  f"{'✔' if r['chosen'] else ''} |" for r in rows]
    lines += ["", "## CKKS parameter choice (depth 1, 128-bit bound, flooding σ before gains ≤ 0.5)", "",
              "| N | coeff_mod_bit_sizes | scale | bits / limit | σ | usable |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['poly_modulus_degree']} | {r['coeff_mod_bit_sizes']} | 2^{r['scale_bits']} | "
              f"{r['total_bits']} / {r['limit_bits']} | {r['sigma']:.3g} | {'yes' if r['ok'] else 'no'} |"
              for r in result.get("ckks_choice", [])]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out.with_suffix(".md")
    store.write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
