"""What a ``latentlm compare`` experiment will cost on this machine, measured on short slices.

Every stage of the experiment is run for a few steps in a scratch directory, with the experiment's
own shapes and settings, and timed: the teacher's training steps, SAE steps, concept labels (a
label cache of a few windows), each run's training steps (its first seed) and its evaluation
forward passes. Each measured rate is multiplied by the amount of work the real experiment does
(its step counts from the budget, the size of the train split for the label cache, its seeds,
its evaluation tokens), so the total is an extrapolation from measured rates, not a FLOP guess.
Data preparation is done for real (it is the experiment's own first stage and is reused by it).

Shared stages are keyed by their output path, so estimates of several experiments with one
``out_dir`` count a shared teacher, SAE, label cache or identical run once (:func:`total_seconds`).
Two clocks are kept. Wall time on a busy machine is an upper bound (the load average at the
time is recorded). CPU time (the process's, timed single-threaded, so no thread spins on a busy
core) is what the work itself takes: it changes less with the load (still by up to 2x on the
project's shared machine), and ``quiet`` converts it to a quiet machine's wall time with a
calibration run of a known quiet speed (:data:`QUIET_NTP`) timed before and after the stages.
Every stage is timed by difference (a slice of ``2 + steps`` steps minus one of 2), so model
building, data loading and the final evaluation of a slice cancel out.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from latentlm.compare import Comparison, _merge, labels_windows_read, load_experiment, plan, run_seeds
from latentlm.concepts.labels import build_label_cache
from latentlm.concepts.sae import load_sae, train_sae_on_teacher
from latentlm.concepts.teacher import load_teacher
from latentlm.config import make_config
from latentlm.data.loader import TokenSplit
from latentlm.data.prepare import load_manifest, prepare, tokenizer_for
from latentlm.data.sources import iter_documents
from latentlm.data.tokenizers import load_tokenizer, train_bpe
from latentlm.errors import LatentLMError
from latentlm.eval.perplexity import evaluate_tokens
from latentlm.loading import load_method
from latentlm.methods import BASELINE, method_class
from latentlm.train.trainer import train


# The quiet-machine reference: `make demo`'s NTP student (llama 4 x 128, BPE 8192, 16 x 128 tokens per
# step) trained at 9,554 tokens/s on the project's 2-core CPU machine with nothing else running
# (docs/RESULTS.md). quiet seconds = CPU seconds x (this machine's single-thread CPU rate of that same
# run / 9,554): the quiet 2-core machine's speed-up over one core here is taken as equal for every
# stage (an approximation: stages parallelise differently).
QUIET_NTP = {"tok_per_s": 9554.0, "model": {"arch": "llama", "vocab_size": 8192, "block_size": 128, "n_layer": 4,
                                             "n_head": 4, "n_embd": 128, "embed_scale": 17.888544},
             "train": {"batch_size": 16}, "seq_len": 128}


class Clock:
    """Wall and process CPU seconds of a block (``with Clock() as c: ...; c.wall, c.cpu``)."""

    def __enter__(self) -> "Clock":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


def _by_difference(run, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``run(n)`` (which does n steps), from ``run(2 + steps) - run(2)``."""
    with Clock() as short:
        run(2)
    with Clock() as long:
        run(2 + steps)
    return max(long.wall - short.wall, 1e-9) / steps, max(long.cpu - short.cpu, 1e-9) / steps


def _small_data(c: Comparison, data: Path, scratch: Path, windows: int, seq_len: int) -> Path:
    """A prepared directory with the real data's tokenizer and source, only big enough for ``windows``
    training windows (so a label cache of every window is cheap); its val split is 20%."""
    out = scratch / "data"
    try:
        load_manifest(out)
        return out
    except LatentLMError:
        pass
    m = load_manifest(data)
    source = m["source"].get("source")
    if not isinstance(source, str):
        raise LatentLMError(f"{data} records no source to take a timing sample from; prepare it from a source")
    per_doc = max(1.0, m["splits"]["train"]["tokens"] / max(1, m["splits"]["train"]["documents"]))
    limit = max(8, math.ceil(1.5 * windows * (seq_len + 1) / per_doc / 0.8))
    prepare(source, tokenizer_for(m, data), out, val_fraction=0.2, limit=limit, overwrite=True, progress=False,
            workers=1)
    have = (TokenSplit(out, "train").__len__() - 1) // seq_len
    if have < windows:
        raise LatentLMError(f"the timing sample of {source} has {have} windows, fewer than {windows}; "
                            "lower the timed steps")
    return out


def _timed_train(cfg, steps: int, out_dir: Path) -> tuple[float, float]:
    """(wall, CPU) seconds per optimizer step of ``cfg`` (slices trained into ``out_dir``-2 and
    ``out_dir``, no periodic evaluation or checkpoints)."""
    def run(n: int) -> None:
        c = copy.deepcopy(cfg)
        tc = c.train
        tc.out_dir = str(out_dir if n > 2 else out_dir.with_name(out_dir.name + "-2"))
        tc.max_steps, tc.log_every, tc.progress, tc.eval_every, tc.ckpt_every, tc.eval_batches = n, n, False, 0, 0, 1
        tc.warmup_steps = min(tc.warmup_steps, 1)
        shutil.rmtree(tc.out_dir, ignore_errors=True)
        train(c)

    return _by_difference(run, steps)


def _eval_rate(run_dir: Path, data: Path, seq_len: int, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) tokens/s of the held-out forward pass of the trained slice (the methods' eval path)."""
    method, _, _ = load_method(run_dir)
    tokens = TokenSplit(data, "train")
    n = min(len(tokens) - 1, 2 * batch_size * seq_len)
    evaluate_tokens(method, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=seq_len)  # warm-up
    with Clock() as c:
        evaluate_tokens(method, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=n)
    return n / max(c.wall, 1e-9), n / max(c.cpu, 1e-9)


def calibrate(data: Path, scratch: Path, steps: int) -> dict[str, float]:
    """This machine's single-thread CPU rate of the :data:`QUIET_NTP` run on ``data`` (its tokenizer
    must have 8192 ids) and the factor from CPU seconds to quiet 2-core wall seconds (that rate over
    the quiet rate: a quiet second does the work of 1 / factor CPU seconds here)."""
    cfg = make_config(None, base={"model": QUIET_NTP["model"], "data": {"path": str(data), "seq_len": QUIET_NTP["seq_len"]},
                                  "train": {**QUIET_NTP["train"], "out_dir": str(scratch / "calibrate")}})
    _, cpu = _timed_train(cfg, max(steps, 10), scratch / "calibrate")  # cheap: more steps, less noise
    rate = QUIET_NTP["train"]["batch_size"] * QUIET_NTP["seq_len"] / cpu
    return {"ntp_cpu_tok_per_s": rate, "factor": rate / QUIET_NTP["tok_per_s"]}


def _stage(key: str, stage: str, what: str, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {"key": key, "stage": stage, "what": what, "wall_seconds": wall, "cpu_seconds": cpu, **extra}


def estimate_cost(path: str | Path, scratch: str | Path, *, steps: int = 4, calibration: dict | None = None,
                  stand_ins: dict[str, str] | None = None) -> dict[str, Any]:
    """Measured cost of the experiment in ``path`` (see the module docstring): ``{"experiment",
    "load_average", "stages": [{"key", "stage", "what", "wall_seconds", "cpu_seconds", ...}],
    "wall_seconds", "cpu_seconds", "quiet_seconds"}`` (quiet: CPU seconds times the calibration
    factor of :func:`calibrate`, measured before and after the stages and averaged, because a busy
    machine's speed drifts; or ``calibration`` if given).

    Each stage is timed over ``steps`` extra steps (by difference), single-threaded. ``scratch``
    holds the slices; the real experiment's outputs are never written, except its prepared data
    (its first stage, done here for real). ``stand_ins`` maps a teacher or SAE path that another
    experiment will make (not there yet) to the slice standing in for it: the ``"stand_ins"`` of
    that experiment's estimate."""
    if steps < 1:
        raise LatentLMError(f"steps={steps}: time at least 1 step")
    exp = load_experiment(path)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _estimate(exp, path, scratch, steps, calibration, stand_ins or {})
    finally:
        torch.set_num_threads(threads)


def _estimate(exp: dict, path, scratch: Path, steps: int, calibration: dict | None, stand_ins: dict[str, str]
              ) -> dict[str, Any]:
    c = Comparison(exp, progress=False)
    c.log = lambda msg: None
    stages: list[dict[str, Any]] = []
    with Clock() as clock:
        prepared = c.data()
    stages.append(_stage(str(prepared), "data", "prepare (done here for real; reused by the experiment)", clock.wall,
                         clock.cpu))
    seq_len = c.config({"data": {"path": str(prepared)}}).seq_len
    batch = max(c.config(_merge(r.get("overrides") or {}, {"data": {"path": str(prepared)}})).train.batch_size
                for r in exp["runs"].values())
    small = _small_data(c, prepared, scratch, windows=(2 + steps) * batch + 1, seq_len=seq_len)
    if calibration is None:
        cal_data = small if _vocab(small) == 8192 else _calibration_data(scratch)
        before = calibrate(cal_data, scratch, steps)
    train_tokens = len(TokenSplit(prepared, "train"))

    # Shared artifacts: a teacher slice (or the given teacher), an SAE slice, a label-cache slice.
    runs = exp["runs"]
    shared: dict[str, dict[str, Any]] = {}
    if exp.get("teacher") is not None and any(method_class(r["method"]).needs_teacher for r in runs.values()):
        t = exp["teacher"]
        if "path" in t:
            teacher_path = stand_ins.get(str(t["path"]), t["path"])
        else:
            tcfg = c.config(_merge(t.get("overrides") or {}, {"data": {"path": str(small)}, "train": {
                "method": BASELINE, "out_dir": str(scratch / "teacher"), "progress": False}}))
            wall, cpu = _timed_train(tcfg, steps, scratch / "teacher")
            n = tcfg.train.max_steps
            tokens = n * tcfg.train.batch_size * tcfg.seq_len * tcfg.train.grad_accum
            stages.append(_stage(str(c.out / "teacher"), "teacher", f"{n} steps, {tokens:,} tokens", n * wall, n * cpu,
                                 cpu_tok_per_s=tokens / n / cpu))
            teacher_path = str(scratch / "teacher")
        shared["teacher"] = {"path": teacher_path}
        s = exp.get("sae")
        if s is not None:
            teacher = load_teacher(teacher_path)
            if "path" in s:
                sae_dir = stand_ins.get(str(s["path"]), s["path"])
            else:
                kw = dict(layer=s["layer"], latents=s.get("latents", 4096), k=s.get("k", 32), lr=s.get("lr", 4e-4),
                          batch_tokens=s.get("batch_tokens", 4096), seq_len=seq_len, eval_tokens=seq_len,
                          progress=False, **{k: s[k] for k in ("aux_k", "aux_coef", "dead_tokens") if k in s})

                def sae_run(n: int) -> None:
                    out = scratch / ("sae" if n > 2 else "sae-2")
                    shutil.rmtree(out, ignore_errors=True)
                    train_sae_on_teacher(teacher, small, out, steps=n, **kw)

                # Both slices read their activations from one fill of the shuffle pool (8 batches), so
                # the difference is the SAE's own work; the teacher's forward passes are timed apart.
                wall, cpu = _by_difference(sae_run, min(steps, 6))
                x = torch.as_tensor(TokenSplit(small, "train").get(0, 4 * seq_len).astype("int64")).view(4, seq_len)
                with torch.no_grad():
                    teacher.hidden(x[:1], s["layer"])  # warm-up
                    with Clock() as h:
                        teacher.hidden(x, s["layer"])
                n, ev_tokens = s.get("steps", 1000), s.get("eval_tokens", 50_000)
                per = (n * kw["batch_tokens"] + ev_tokens) / (4 * seq_len)  # teacher passes of 4 windows
                stages.append(_stage(str(c.out / "sae"), "sae", f"{n} steps x {kw['batch_tokens']:,} tokens, val on "
                                     f"{ev_tokens:,} tokens", n * wall + per * h.wall, n * cpu + per * h.cpu,
                                     teacher_cpu_tok_per_s=4 * seq_len / h.cpu))
                sae_dir = str(scratch / "sae")
            shared["concepts"] = {"sae": sae_dir, "layer": s["layer"]}
            labelled = next(((n, r) for n, r in runs.items() if method_class(r["method"]).needs_concept_labels), None)
            if labelled and exp.get("labels", True) is not False:
                lcfg = c.run_config(*labelled, small, shared)
                cc = lcfg.concepts
                small_tokens = ((len(TokenSplit(small, "train")) - 1) // seq_len) * seq_len
                shutil.rmtree(scratch / "labels", ignore_errors=True)
                with Clock() as lab:
                    build_label_cache(small, teacher, load_sae(sae_dir), scratch / "labels", seq_len=seq_len,
                                      layer=cc.layer, k_attr=cc.k_attr, acts=cc.acts, select=cc.select, score=cc.score,
                                      last_position=cc.last_position, batch_size=lcfg.train.batch_size, progress=False)
                if not isinstance(exp.get("labels"), str):
                    only = labels_windows_read(exp)
                    windows = len(c.windows_read(prepared, shared)) if only else (train_tokens - 1) // seq_len
                    f = windows * seq_len / small_tokens
                    what = "the windows the runs read" if only else "the train split"
                    stages.append(_stage(str(c.out / "labels"), "labels", f"{windows:,} windows ({windows * seq_len:,} "
                                         f"tokens: {what})", f * lab.wall, f * lab.cpu,
                                         cpu_tok_per_s=small_tokens / lab.cpu))
                shared["concepts"]["labels"] = str(scratch / "labels")

    # Runs: each one's first seed timed; the step count from the real data; every seed counted.
    ev = c.eval
    val_tokens = len(TokenSplit(prepared, "val")) - 1
    scored = min(val_tokens, ev["tokens"]) if ev["tokens"] else val_tokens
    cap = ev["text_tokens"] if ev["text_tokens"] is not None else ev["tokens"]
    texts = (cap or 0) * len(ev["texts"] or {})  # uncapped texts are not counted
    timed: set[str] = set()
    for name, seed in plan(exp):
        if name in timed:
            continue
        timed.add(name)
        run = runs[name]
        real = c.run_config(name, run, prepared, shared, seed)
        wall, cpu = _timed_train(c.run_config(name, run, small, shared, seed), steps, scratch / "runs" / name)
        tc = real.train
        tokens = tc.max_steps * tc.batch_size * real.seq_len * tc.grad_accum
        ewall, ecpu = _eval_rate(scratch / "runs" / name, small, real.seq_len, ev["batch_size"])
        eval_tokens = ev["points"] * tc.eval_batches * tc.batch_size * real.seq_len + scored + texts
        n = len(run_seeds(exp, run) or [None])
        stages.append(_stage(str(c.out / "runs" / name), f"run {name}",
                             f"{n} x ({tc.max_steps} steps, {tokens:,} tokens + {eval_tokens:,} eval tokens)",
                             n * (tc.max_steps * wall + eval_tokens / ewall), n * (tc.max_steps * cpu + eval_tokens / ecpu),
                             method=tc.method, seeds=n, cpu_tok_per_s=tokens / tc.max_steps / cpu))
    if calibration is None:  # the busy machine's speed drifts: calibrate after the stages too, and average
        after = calibrate(cal_data, scratch, steps)
        rate = (before["ntp_cpu_tok_per_s"] + after["ntp_cpu_tok_per_s"]) / 2
        cal = {"ntp_cpu_tok_per_s": rate, "factor": rate / QUIET_NTP["tok_per_s"],
               "before": before["ntp_cpu_tok_per_s"], "after": after["ntp_cpu_tok_per_s"]}
    else:
        cal = calibration
    for st in stages:
        st["quiet_seconds"] = st["cpu_seconds"] * cal["factor"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    made = {str(c.out / "teacher"): str(scratch / "teacher"), str(c.out / "sae"): str(scratch / "sae")}
    return {"experiment": str(path), "load_average": load, "cpus": os.cpu_count(), "calibration": cal,
            "stand_ins": {k: v for k, v in made.items() if Path(v).exists()},
            "stages": stages, **{k: sum(st[k] for st in stages) for k in ("wall_seconds", "cpu_seconds", "quiet_seconds")}}


def _vocab(data: Path) -> int:
    return int(load_manifest(data)["tokenizer"]["vocab_size"])


def _calibration_data(scratch: Path) -> Path:
    """Token shards with 8192 ids for :func:`calibrate` (ids only matter for the shapes): the wiki
    leads under a BPE of 8192 ids trained on them."""
    out = scratch / "calibration-data"
    try:
        load_manifest(out)
        return out
    except LatentLMError:
        pass
    tok = scratch / "calibration-bpe.json"
    train_bpe(iter_documents("wiki", limit=2000), 8192, tok)
    prepare("wiki", load_tokenizer("bpe", tok), out, val_fraction=0.2, limit=400, overwrite=True, progress=False,
            workers=1)
    return out


def total_seconds(estimates: list[dict[str, Any]], clock: str = "quiet_seconds") -> float:
    """The seconds (``clock``: wall_seconds, cpu_seconds or quiet_seconds) of several estimates, each
    shared stage (same output path) counted once."""
    seen: dict[str, float] = {}
    for e in estimates:
        for s in e["stages"]:
            seen.setdefault(s["key"], s[clock])
    return sum(seen.values())


def format_estimate(e: dict[str, Any]) -> str:
    cal = e["calibration"]
    drift = f" (before {cal['before']:,.0f}, after {cal['after']:,.0f})" if "before" in cal else ""
    lines = [f"{e['experiment']}: measured single-threaded on a machine with {e['cpus']} CPUs at load average "
             f"{e['load_average']:.1f}; wall = this busy machine (an upper bound), quiet = CPU seconds x "
             f"{cal['ntp_cpu_tok_per_s']:,.0f} / {QUIET_NTP['tok_per_s']:,.0f} (the demo NTP run's single-thread CPU "
             f"rate here{drift} over its measured quiet 2-core rate)",
             "| stage | work | CPU tokens/s | wall s (busy) | CPU s | quiet s |", "|---|---|---:|---:|---:|---:|"]
    for s in e["stages"]:
        rate = f"{s['cpu_tok_per_s']:,.0f}" if "cpu_tok_per_s" in s else ""
        lines.append(f"| {s['stage']} | {s['what']} | {rate} | {s['wall_seconds']:,.0f} | {s['cpu_seconds']:,.0f} | "
                     f"{s['quiet_seconds']:,.0f} |")
    lines.append(f"| total | | | {e['wall_seconds']:,.0f} | {e['cpu_seconds']:,.0f} | {e['quiet_seconds']:,.0f} |")
    return "\n".join(lines)
