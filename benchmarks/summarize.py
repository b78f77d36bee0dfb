"""Markdown summary of benchmark JSON files (for benchmarks/README.md).

    python benchmarks/summarize.py benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def machine(r: dict) -> str:
    m = r["machine"]
    where = m.get("gpu") or f"{m['nproc']}x {m.get('cpu_model') or 'CPU'}"
    busy = " (other jobs running)" if m.get("busy_python_processes") else ""
    return f"{where}, {m['torch_threads']} thread(s){busy}, {m['date_utc'][:16]}Z"


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    name = r["benchmark"]
    out = []
    if name == "extractor":
        tps = r["tokens_per_s"]
        head = r["target"]["what"].split(" ")[0]
        diff = max(c["max_abs_diff"] for c in r["equality"].values())
        out.append(("extractor vs naive (tokens/s)",
                    f"ours {fmt(tps[head])} / naive {fmt(tps['naive'])} (max abs diff {diff:.1e})",
                    f"{fmt(r['target']['ratio'])}x (>= 2)", "met" if r["target"]["met"] else "missed"))
    elif name == "sae_grid":
        s = r["seconds"]
        src = "organism acts" if r["data"]["source"].startswith("organism") else "synthetic"
        init = r["setup"].get("init", "random").split(" ")[0]
        out.append((f"SAE grid, {r['setup']['n_saes']} SAEs x {r['setup']['epochs']} epochs, {src} "
                    f"{r['data']['n_vectors']}x{r['data']['d_in']}, {init} init",
                    f"ours {fmt(s['ours_grid_one_job']['median'], 1)} s / sae-lens "
                    f"{fmt(s['sae_lens_loop']['median'], 1)} s; max dFVU {r['fvu']['max_abs_diff_final']:.3f}",
                    f"{fmt(r['ratio_sae_lens_over_ours'])}x (>= 5, dFVU <= 0.01)",
                    "met" if r["target"]["met"] else "missed"))
    elif name == "steering":
        e = r["examples_per_s"]
        keys = sorted(e)
        out.append(("steering-vector training (examples/s)", " / ".join(f"{k} {fmt(e[k], 1)}" for k in keys),
                    f"{fmt(r['ratio_batched_over_one'])}x", "no target"))
    elif name == "hybrid":
        for s in r["settings"]:
            t = s["tokens_per_s"]
            base = max(t["base_hf_generate"], t["base_cached_loop"])
            ref = s["reference"]["tokens_per_s"]["p_measured"]
            diags = [(k.replace("diag_hybrid_", "").replace("sentence_", ""), v) for k, v in t.items()
                     if k.startswith("diag_hybrid_")]  # every diagnostic run, with its ratio to base-only
            diag = "".join(f"; diag {k} {fmt(v, 1)} (x base {fmt(v / base)})" for k, v in diags)
            out.append((f"hybrid N={s['new_tokens']} batch={s['batch']} (tokens/s)",
                        f"sentence {fmt(t['hybrid_sentence'], 1)} / token {fmt(t['hybrid_token'], 1)} / base "
                        f"{fmt(base, 1)} / reference {fmt(ref, 2)}{diag}",
                        f"x base {fmt(s['hybrid_over_base']['hybrid_sentence'])} / "
                        f"{fmt(s['hybrid_over_base']['hybrid_token'])}; x reference "
                        f"{fmt(s['hybrid_over_reference']['hybrid_sentence']['p_measured'], 0)} / "
                        f"{fmt(s['hybrid_over_reference']['hybrid_token']['p_measured'], 0)}", ""))
        tb, tr = r["targets"]["hybrid_over_base"], r["targets"]["hybrid_over_reference"]
        out.append(("hybrid targets (largest N)", "", f"min x base {fmt(tb['min_ratio'])} (>= 0.45); min x "
                    f"reference {fmt(tr['min_ratio'])} (>= 100)",
                    f"{'met' if tb['met'] else 'missed'} / {'met' if tr['met'] else 'missed'}"))
    return out


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    results = [json.loads(p.read_text()) for p in paths if p.suffix == ".json"]
    print("| benchmark | figures | ratio (target) | target | machine |")
    print("|---|---|---|---|---|")
    for r in results:
        for a, b, c, d in rows(r):
            print(f"| {a} | {b} | {c} | {d} | {machine(r)} |")


if __name__ == "__main__":
    main()
