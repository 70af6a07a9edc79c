"""The report of a comparison with seeds (``seeds:``), a ``baseline:`` run or held-out texts
(``eval.texts``): every metric as mean +- std over seeds, the per-seed table, the paired
difference of each run to the baseline run with its spread, and curves with error bands.

A seed is ``train.seed``: it draws the initial weights and the order of the training windows (and
ponder's Jacobi iteration counts). Runs of one seed share both, so the difference between two runs
at the same seed is free of the init / data-order noise they share; the differences over seeds
are the paired sample this report summarises: their mean, sample std (n - 1), n and a 95%
t-interval (mean +- t_{0.975, n-1} std / sqrt(n)).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from latentlm.fileio import write_json_atomic, write_text_atomic
from latentlm.methods import BASELINE
from latentlm.report import _si, curves_note, init_note, plot_curves

# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30 (beyond: the normal 1.960).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.960


def mean_std(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of ``values`` (NaN-free); std is the sample std (n - 1), None for n = 1."""
    n = len(values)
    return {"mean": statistics.fmean(values) if n else None, "std": statistics.stdev(values) if n > 1 else None, "n": n}


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean, sample std, n and the 95% t-interval of per-seed differences (no interval for n = 1)."""
    out = mean_std(diffs)
    if out["std"] is not None:
        half = t975(out["n"] - 1) * out["std"] / math.sqrt(out["n"])
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    else:
        out["ci95"] = None
    return out


def _zeroshot_acc(m: dict) -> float:
    return m["acc_norm"] if "acc_norm" in m else m["acc"]


def row_metrics(r: dict) -> dict[str, float]:
    """The scored numbers of one (run, seed): held-out loss and bpb, each text's loss and bpb, each
    zero-shot task's accuracy and their mean (only when every task is there), tokens/s."""
    m: dict[str, float] = {"val loss": r["val"]["loss"]}
    if r["val"].get("bpb") is not None:
        m["val bpb"] = r["val"]["bpb"]
    for name, t in (r.get("texts") or {}).items():
        m[f"{name} loss"] = t["loss"]
        if t.get("bpb") is not None:
            m[f"{name} bpb"] = t["bpb"]
    accs = {task: _zeroshot_acc(v) for task, v in (r.get("zeroshot") or {}).items() if v}
    for task, acc in accs.items():
        m[f"{task} acc"] = acc
    if accs:
        m["zero-shot mean acc"] = statistics.fmean(accs.values())
    m["tokens/s"] = r["tok_per_s"]
    return {k: v for k, v in m.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


HIGHER_IS_BETTER = ("acc", "tokens/s")


def higher_is_better(metric: str) -> bool:
    return metric.endswith(HIGHER_IS_BETTER)


def group_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows (one per run and seed) by run name, in the experiment's order, each sorted by seed."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    return {name: sorted(rs, key=lambda r: r["seed"]) for name, rs in groups.items()}


def summarize(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per run: method, seeds, the budget columns of its first seed (equal for every seed) and every
    metric as mean +- std over its seeds."""
    out = {}
    for name, rs in group_runs(rows).items():
        per = [row_metrics(r) for r in rs]
        keys = list(dict.fromkeys(k for p in per for k in p))
        first = rs[0]
        out[name] = {"method": first["method"], "seeds": [r["seed"] for r in rs],
                     **{k: first[k] for k in ("params", "tokens", "flops_per_token", "train_flops",
                                              "infer_flops_per_token")},
                     "metrics": {k: mean_std([p[k] for p in per if k in p]) for k in keys}}
    return out


PAIRED_METRICS = ("loss", "bpb", "zero-shot mean acc")


def paired_differences(rows: list[dict], baseline: str) -> dict[str, dict[str, Any]]:
    """For every run but ``baseline``: per metric (losses, bpb, the zero-shot mean), the differences
    run - baseline at each seed both were trained with, and their :func:`paired` summary plus how
    many seeds favour the run (lower loss / bpb, higher accuracy)."""
    groups = group_runs(rows)
    if baseline not in groups:
        return {}
    base = {r["seed"]: row_metrics(r) for r in groups[baseline]}
    out: dict[str, dict[str, Any]] = {}
    for name, rs in groups.items():
        if name == baseline:
            continue
        mine = {r["seed"]: row_metrics(r) for r in rs}
        seeds = [s for s in mine if s in base]
        metrics = {}
        for key in dict.fromkeys(k for s in seeds for k in mine[s]):
            if not key.endswith(PAIRED_METRICS):
                continue
            both = [s for s in seeds if key in mine[s] and key in base[s]]
            if not both:
                continue
            diffs = [mine[s][key] - base[s][key] for s in both]
            better = sum((d > 0) if higher_is_better(key) else (d < 0) for d in diffs)
            metrics[key] = {**paired(diffs), "seeds": both, "diffs": diffs, "better": better}
        out[name] = metrics
    return out


def _pm(ms: dict[str, Any], digits: int = 4, scale: float = 1.0) -> str:
    if ms is None or ms.get("mean") is None:
        return "n/a"
    mean = ms["mean"] * scale
    if ms.get("std") is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def _scored(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The loss / bpb metric columns present in any run, held-out split first, then each text."""
    keys = list(dict.fromkeys(k for s in summary.values() for k in s["metrics"]))
    return [k for k in keys if k.endswith((" loss", " bpb"))]


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    ntp = next((s for s in summary.values() if s["method"] == BASELINE), None)
    cols = _scored(summary)
    zs = any("zero-shot mean acc" in s["metrics"] for s in summary.values())
    head = ["run", "method", "seeds", "params", "train tokens", "train FLOPs (teacher incl.)", "FLOPs x ntp",
            "gen FLOPs/token x ntp", "tokens/s", *cols, *(["zero-shot mean %"] if zs else [])]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for name, s in summary.items():
        rel = f"{s['flops_per_token'] / ntp['flops_per_token']:.2f}" if ntp else "n/a"
        gen = f"{s['infer_flops_per_token'] / ntp['infer_flops_per_token']:.2f}" if ntp else "n/a"
        m = s["metrics"]
        cells = [name, s["method"], str(len(s["seeds"])), f"{s['params'] / 1e6:.2f}M", f"{s['tokens']:,}",
                 _si(s["train_flops"]), rel, gen, f"{m['tokens/s']['mean']:,.0f}" if "tokens/s" in m else "n/a",
                 *(_pm(m.get(c)) for c in cols)]
        if zs:
            cells.append(_pm(m.get("zero-shot mean acc"), 1, 100))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(rows: list[dict]) -> str:
    metrics = [row_metrics(r) for r in rows]
    cols = list(dict.fromkeys(k for m in metrics for k in m if k.endswith((" loss", " bpb"))))
    zs = any("zero-shot mean acc" in m for m in metrics)
    head = ["run", "seed", *cols, *(["zero-shot mean %"] if zs else [])]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for name, rs in group_runs(rows).items():
        for r in rs:
            m = row_metrics(r)
            cells = [name, str(r["seed"]), *(f"{m[c]:.4f}" if c in m else "n/a" for c in cols)]
            if zs:
                cells.append(f"{100 * m['zero-shot mean acc']:.1f}" if "zero-shot mean acc" in m else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(diffs: dict[str, dict[str, Any]], baseline: str) -> str:
    lines = [f"| run | metric | n | Δ vs {baseline} (mean ± std) | 95% CI | seeds better |", "|---|---|---:|---:|---:|---:|"]
    for name, metrics in diffs.items():
        for key, d in metrics.items():
            scale, digits = (100, 2) if key.endswith("acc") else (1, 4)
            ci = "n/a" if d["ci95"] is None else f"[{d['ci95'][0] * scale:+.{digits}f}, {d['ci95'][1] * scale:+.{digits}f}]"
            mean = f"{d['mean'] * scale:+.{digits}f}" + ("" if d["std"] is None else f" ± {d['std'] * scale:.{digits}f}")
            unit = " (points)" if key.endswith("acc") else ""
            lines.append(f"| {name} | {key}{unit} | {d['n']} | {mean} | {ci} | {d['better']}/{d['n']} |")
    return "\n".join(lines)


def zeroshot_seeds_table(summary: dict[str, dict[str, Any]]) -> str:
    tasks = list(dict.fromkeys(k[:-4] for s in summary.values() for k in s["metrics"]
                               if k.endswith(" acc") and k != "zero-shot mean acc"))
    if not tasks:
        return ""
    lines = ["| run | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for name, s in summary.items():
        m = s["metrics"]
        lines.append(f"| {name} | " + " | ".join(_pm(m.get(f"{t} acc"), 1, 100) for t in tasks)
                     + f" | {_pm(m.get('zero-shot mean acc'), 1, 100)} |")
    return "\n".join(lines)


def write_seeded_report(exp: dict, rows: list[dict], out: Path, wall_seconds: float) -> Path:
    """results.json (rows, the per-run summary, the paired differences), the plots (mean curves
    with +- std bands) and report.md under ``out``; returns report.md's path."""
    summary = summarize(rows)
    baseline = exp.get("baseline")
    diffs = paired_differences(rows, baseline) if baseline else {}
    write_json_atomic(out / "results.json", {"experiment": exp, "runs": rows, "summary": summary,
                                             "baseline": baseline, "paired": diffs})
    plots = plot_curves(rows, out, exp.get("name", "Comparison"))
    budget = exp["budget"]
    what = (f"equal training tokens ({budget['tokens']:,})" if "tokens" in budget
            else f"equal training FLOPs ({_si(budget['flops'])}, teacher included)")
    ev = exp.get("eval") or {}
    seeds = sorted({r["seed"] for r in rows})
    texts = ev.get("texts") or {}
    cap = ev.get("text_tokens", ev.get("tokens"))
    scored = f"the same {'first ' + format(ev['tokens'], ',') + ' ' if ev.get('tokens') else ''}validation tokens"
    if texts:
        scored += (f" and the same held-out texts ({', '.join(f'{n}: source {s}' for n, s in texts.items())}; "
                   f"{'the first ' + format(cap, ',') + ' tokens of ' if cap else ''}texts/NAME.txt)")
    parts = [f"# {exp.get('name', 'Comparison')}", "",
             f"Budget: {what}. Seeds {', '.join(map(str, seeds))}: a seed (train.seed) draws the initial weights "
             "and the order of the training windows, and runs of the same seed share both. Numbers are mean ± "
             f"sample std over a run's seeds. Every run scores {scored} with its own forward pass.", "",
             summary_table(summary), "", init_note([rs[0] for rs in group_runs(rows).values()]), ""]
    parts += [f"## Paired differences to {baseline}" if baseline else "## Paired differences", ""]
    if baseline:
        parts += [f"Per seed, run minus {baseline} at the same seed (same init and data order); mean ± sample "
                  "std over seeds, n, the 95% t-interval of the mean, and on how many seeds the run is better "
                  "(lower loss / bpb, higher accuracy). An interval that contains 0 means no difference was "
                  "resolved at this n.", "", paired_table(diffs, baseline), ""]
    else:
        parts += ["No baseline named: set `baseline: RUN` in the experiment file.", ""]
    parts += ["## Per seed", "", per_seed_table(rows), ""]
    zs = zeroshot_seeds_table(summary)
    if zs:
        parts += ["## Zero-shot (accuracy %, mean ± std over seeds)", "", zs, ""]
    parts += ["## Validation loss", ""]
    if isinstance(plots, str):
        parts.append(plots)
    else:
        parts += ["Mean over seeds; the band is ± one sample std.", "",
                  f"![validation loss vs tokens]({plots[0].name})", "", f"![validation loss vs FLOPs]({plots[1].name})"]
    parts += ["", curves_note(rows)]
    parts += ["", "Params count every trained parameter (CoCoMix includes its concept head). FLOPs follow "
              "docs/PONDER.md / docs/COCOMIX.md (PaLM convention); generation FLOPs are per token at a full "
              f"context. tokens/s is the mean over seeds of each run's median logging window. This invocation "
              f"took {wall_seconds:.0f} s (stages already complete were skipped).", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path
