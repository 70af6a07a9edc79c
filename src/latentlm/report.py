"""The comparison report: one results table, a zero-shot table, and validation-loss curves against
training tokens and training FLOPs (one line per run), written as report.md, results.json and
PNG plots (the plots need matplotlib: ``pip install 'latentlm[plots]'``; without it the report
says so and keeps the tables)."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

from latentlm.methods import BASELINE
from latentlm.fileio import atomic_file, write_json_atomic, write_text_atomic
from latentlm.train.metrics import read_metrics


def run_summary(name: str, cfg, flops_row: dict, ev: dict, curve_tokens: int | None = None) -> dict[str, Any]:
    """One run's row: size, budget actually trained, throughput, held-out and zero-shot scores, and
    its validation curve (tokens, FLOPs, loss) from the trainer's periodic evaluations, each of which
    scored ``curve_tokens`` validation tokens (None: not known)."""
    run = Path(cfg.train.out_dir)
    records = read_metrics(run / "metrics.jsonl")
    speeds = [r["tok_per_s"] for r in records if "tok_per_s" in r]
    tokens = max((r.get("tokens", 0) for r in records), default=0)
    per_token = flops_row["train_total"]
    curve = [(r["tokens"], r["tokens"] * per_token, r["val_loss"]) for r in records if "val_loss" in r]
    return {"name": name, "method": cfg.train.method, "init": cfg.model.init_description(),
            "embed_scale": cfg.model.embed_scale, "params": flops_row["params"], "tokens": tokens,
            "steps": cfg.train.max_steps, "flops_per_token": per_token, "teacher_flops_per_token": flops_row["teacher"],
            "train_flops": tokens * per_token, "infer_flops_per_token": flops_row["infer"],
            # the median logging window: robust to the first window's warm-up and to evaluation pauses
            "tok_per_s": statistics.median(speeds) if speeds else float("nan"),
            "val": ev["val"], "zeroshot": ev.get("zeroshot", {}), "zeroshot_prefix": ev.get("zeroshot_prefix"),
            "curve": curve, "curve_tokens": curve_tokens}


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def results_table(rows: list[dict]) -> str:
    ntp = next((r for r in rows if r["method"] == BASELINE), None)
    lines = ["| run | method | params | train tokens | train FLOPs (teacher incl.) | FLOPs x ntp | "
             "gen FLOPs/token x ntp | tokens/s | val loss | val ppl | val bpb |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r['flops_per_token'] / ntp['flops_per_token']:.2f}" if ntp else "n/a"
        gen = f"{r['infer_flops_per_token'] / ntp['infer_flops_per_token']:.2f}" if ntp else "n/a"
        v = r["val"]
        lines.append(f"| {r['name']} | {r['method']} | {r['params'] / 1e6:.2f}M | {r['tokens']:,} | {_si(r['train_flops'])} | "
                     f"{rel} | {gen} | {r['tok_per_s']:,.0f} | {_fmt(v['loss'])} | {_fmt(v['ppl'], 2)} | {_fmt(v['bpb'])} |")
    return "\n".join(lines)


def init_note(rows: list[dict]) -> str:
    """Which initialisation and token-embedding scale the runs used (``model.init``,
    ``model.embed_scale``): one sentence when they share them, a per-run list when they differ (then
    the comparison is confounded by the init, as the authors' vanilla control was)."""
    def of(r: dict) -> tuple[str, str]:
        scale = r.get("embed_scale")
        return r.get("init", "not recorded"), "not recorded" if scale is None else f"{scale:g}"

    inits = {of(r) for r in rows}
    if len(inits) == 1:
        init, scale = next(iter(inits))
        return f"Initialisation (model.init), the same for every run: {init}; token embeddings times {scale}."
    listed = "; ".join(f"{r['name']}: {of(r)[0]}, embeddings times {of(r)[1]}" for r in rows)
    return f"Initialisation differs between runs (a confound: set model.init and model.embed_scale alike): {listed}."


def zeroshot_table(rows: list[dict]) -> str:
    """Accuracy per task (acc_norm where the task has it, LAMBADA last-word accuracy) +- standard error."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["zeroshot"]))
    if not tasks:
        return ""
    lines = ["| run | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for r in rows:
        cells, accs = [], []
        for t in tasks:
            m = r["zeroshot"].get(t)
            if not m:
                cells.append("n/a")
                continue
            key = "acc_norm" if "acc_norm" in m else "acc"
            accs.append(m[key])
            cells.append(f"{100 * m[key]:.1f} ± {100 * m.get(key + '_stderr', float('nan')):.1f}")
        mean = f"{100 * sum(accs) / len(accs):.1f}" if len(accs) == len(tasks) else "n/a"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {mean} |")
    n = {t: next(r["zeroshot"][t].get("n") for r in rows if t in r["zeroshot"]) for t in tasks}
    lines.append("")
    prefixes = sorted({r.get("zeroshot_prefix") or "eos" for r in rows if r["zeroshot"]})
    lines.append("Examples per task: " + ", ".join(f"{t} {n[t]}" for t in tasks) + ". Accuracy in %: acc_norm "
                 "(length-normalised) for multiple choice, last-word accuracy for LAMBADA (docs/EVAL.md). Request "
                 f"prefix: {', '.join(prefixes)} (eval.prefix; docs/EVAL.md).")
    return "\n".join(lines)


def seed_band(curves: list[list]) -> list[tuple[float, float]]:
    """(mean, sample std) of the validation loss over the curves of several seeds of one run, at
    each evaluation point every seed reached (seeds of a run evaluate at the same tokens); the std
    is 0 for a single curve."""
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        ys = [c[i][2] for c in curves]
        out.append((statistics.fmean(ys), statistics.stdev(ys) if len(ys) > 1 else 0.0))
    return out


def draw_runs(ax, rows: list[dict], axis: int) -> None:
    """One line per run on ``ax`` (x: tokens for axis 0, FLOPs for 1). Rows sharing a name are seeds
    of one run (``seed`` in the row): their mean curve, with a band of +- one std over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["curve"]:
            groups.setdefault(r["name"], []).append(r)
    for name, runs in groups.items():
        if len(runs) == 1 and "seed" not in runs[0]:
            c = runs[0]["curve"]
            ax.plot([p[axis] for p in c], [p[2] for p in c], marker="o", ms=3, label=name)
            continue
        curves = [r["curve"] for r in runs]
        band = seed_band(curves)
        x = [p[axis] for p in curves[0][:len(band)]]
        line, = ax.plot(x, [m for m, _ in band], marker="o", ms=3,
                        label=name if len(runs) == 1 else f"{name} (mean of {len(runs)} seeds, band ± 1 std)")
        if len(runs) > 1:
            ax.fill_between(x, [m - sd for m, sd in band], [m + sd for m, sd in band], color=line.get_color(),
                            alpha=0.2, linewidth=0)


def loss_figure(rows: list[dict], axis: int, title: str):
    """The matplotlib figure of validation loss against training tokens (``axis`` 0) or FLOPs (1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    draw_runs(ax, rows, axis)
    ax.set_title(textwrap.fill(title, 64), fontsize=10)  # a long experiment name wraps instead of being cut
    ax.set_xlabel("training tokens" if axis == 0 else "training FLOPs (teacher included)")
    ax.set_ylabel("validation loss (nats/token)")
    xs = [p[axis] for r in rows for p in r["curve"] if p[axis] > 0]
    # FLOPs over a decade or more on a log axis, labelled at 1-2-5 (or only decades over 2+); a narrower range
    # (equal-FLOP budgets end together) on a linear one, where a log axis would label one tick or none.
    if axis == 1 and xs and math.log10(max(xs) / min(xs)) >= 1:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if math.log10(max(xs) / min(xs)) >= 2
                                              else (1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 300M, 1.5G, 2T
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], out: Path, title: str = "") -> list[Path] | str:
    """loss_vs_tokens.png and loss_vs_flops.png, or the reason they could not be drawn."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'latentlm[plots]')"
    paths = []
    for axis, fname in ((0, "loss_vs_tokens.png"), (1, "loss_vs_flops.png")):
        fig = loss_figure(rows, axis, title)
        path = out / fname
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def curves_note(rows: list[dict]) -> str:
    """Which validation tokens the curves scored, next to the table's."""
    same = [r["name"] for r in rows if r.get("curve_tokens") == r["val"].get("tokens")]
    note = ("Each point is one of the trainer's periodic evaluations (on its device, in its precision); the last "
            "is at the end of training. ")
    if len(same) == len(rows):
        return note + "Every point scores the table's validation tokens, so each curve ends at its run's val loss."
    other = ", ".join(dict.fromkeys(  # once per run, however many seeds it has
        f"{r['name']} {r['curve_tokens']:,}" if r.get("curve_tokens") else f"{r['name']} unknown"
        for r in rows if r["name"] not in same))
    return note + (f"Validation tokens per point ({other}) differ from the table's, so these curves do not end at "
                   "the table's val loss: make eval.tokens a multiple of batch_size x seq_len (docs/COMPARE.md), or "
                   "retrain runs trained before compare matched the two.")


def write_report(exp: dict, rows: list[dict], out: Path, wall_seconds: float) -> Path:
    """results.json, the plots and report.md under ``out``; returns report.md's path."""
    write_json_atomic(out / "results.json", {"experiment": exp, "runs": rows})
    plots = plot_curves(rows, out, exp.get("name", "Comparison"))
    budget = exp["budget"]
    what = (f"equal training tokens ({budget['tokens']:,})" if "tokens" in budget
            else f"equal training FLOPs ({_si(budget['flops'])}, teacher included)")
    held = {r["val"].get("tokens") for r in rows} - {None}
    parts = [f"# {exp.get('name', 'Comparison')}", "",
             f"Budget: {what}. Every run sees the same data order (same seed and batch shape). Held-out "
             f"numbers score the same {'first ' + format(held.pop(), ',') + ' ' if len(held) == 1 else ''}"
             "validation tokens with each method's own forward pass.", "", results_table(rows), "",
             init_note(rows), ""]
    zs = zeroshot_table(rows)
    if zs:
        parts += ["## Zero-shot", "", zs, ""]
    parts += ["## Validation loss", ""]
    if isinstance(plots, str):
        parts.append(plots)
    else:
        parts += [f"![validation loss vs tokens]({plots[0].name})", "",
                  f"![validation loss vs FLOPs]({plots[1].name})"]
    parts += ["", curves_note(rows)]
    parts += ["", f"Params count every trained parameter (CoCoMix includes its concept head). FLOPs follow "
              "docs/PONDER.md / docs/COCOMIX.md (PaLM convention); generation FLOPs are per token at a full "
              f"context. This invocation took {wall_seconds:.0f} s (stages already complete were skipped).", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path
