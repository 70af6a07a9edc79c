"""Training throughput of every method, measured in one run: tokens/s, achieved TFLOP/s, MFU,
memory, and each method's step time relative to NTP's and to its predicted FLOP ratio.

A step is the trainer's step built from the trainer's own pieces (``build_method``,
``build_optimizer``, ``autocast_context``, ``batch_inputs``, ``torch.compile`` with
``--compile``): forward, backward, gradient clipping, the one host sync on [loss, grad norm],
AdamW. Methods are timed round-robin (one step of each per round, median over rounds), so
drifting background load hits all of them alike. Prints one markdown table.

    python benchmarks/train_throughput.py                        # tiny CoCoMix preset, CPU
    python benchmarks/train_throughput.py --config gpt2-124m --device cuda \\
        --batch-size 16 --seq-len 1024 --dtype bfloat16 --compile --steps 20 --warmup 5

FLOPs per token are each method's own ``train_flops_per_token`` (3 x forward, flops.py's
convention) plus, when the step runs a teacher (KD, CoCoMix labels on the fly), the method's
``teacher_flops_per_token``. CoCoMix with cached labels reads labels precomputed by the same
teacher (the cache's per-step work: an index and a host-to-device copy).

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` over a step plus the method's
resident state (weights, AdamW moments, teacher). On CPU there is no allocator peak, so the
column is the resident state plus the bytes autograd saves for backward (exact and
deterministic, a lower bound of the peak: it leaves out backward's temporaries and the
recomputation of checkpointed activations); ``--rss`` adds the peak RSS growth over one warm step in
a fresh process per method (Linux), which does include them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from latentlm.concepts.attribution import concept_labels
from latentlm.concepts.sae import TopKSAE
from latentlm.concepts.teacher import LatentLMTeacher
from latentlm.config import Config, make_config, parse_overrides, save_yaml
from latentlm.methods import build_method
from latentlm.model import losses
from latentlm.model.flops import device_peak_flops
from latentlm.model.transformer import Transformer
from latentlm.perf import emit_json, matmul_flops_ceiling, saved_activation_bytes, synchronize
from latentlm.train.optim import build_optimizer
from latentlm.train.trainer import autocast_context

ROOT = Path(__file__).resolve().parent.parent
MiB = 2 ** 20

# key: (method, config overrides, step work). K of pause/loop/ponderlm is the preset's pause.n_pauses /
# loop.n_loops / ponderlm.n_steps.
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "ntp": ("ntp", {}, "plain"),
    "cocomix-cached": ("cocomix", {}, "cached labels"),
    "cocomix-fly": ("cocomix", {}, "labels on the fly"),
    "kd": ("kd", {}, "teacher logits"),
    "pause": ("pause", {}, "plain"),
    "ponder1": ("ponder", {"ponder": {"n_thoughts": 1}}, "plain"),
    "ponder1-pass": ("ponder", {"ponder": {"n_thoughts": 1, "checkpoint": "pass"}}, "plain"),
    "ponder1-block": ("ponder", {"ponder": {"n_thoughts": 1, "checkpoint": "block"}}, "plain"),
    "ponder2": ("ponder", {"ponder": {"n_thoughts": 2}}, "plain"),
    "loop": ("loop", {}, "plain"),
    "ponderlm": ("ponderlm", {}, "plain"),
}


# The config key holding each method's K (thoughts / pauses / extra passes / pondering steps per token).
K_KEYS = {"ponder": ("ponder", "n_thoughts"), "pause": ("pause", "n_pauses"), "loop": ("loop", "n_loops"),
          "ponderlm": ("ponderlm", "n_steps")}


def label(key: str, cfg: Config) -> str:
    method, _, work = VARIANTS[key]
    if method == "cocomix":
        return f"cocomix, {work}"
    if method in K_KEYS:
        section, k = K_KEYS[method]
        ck = cfg.ponder.checkpoint
        return f"{method} (K={getattr(getattr(cfg, section), k)})" + (f", checkpoint={ck}" if ck != "none" else "")
    return method


class MemoryTeacherLabels:
    """Attribution labels from an in-memory teacher + SAE: what ``OnTheFlyLabels`` computes
    per batch, without loading them from disk (the benchmark's teacher is random)."""

    def __init__(self, teacher, sae: TopKSAE, cfg: Config):
        self.teacher, self.sae, self.c = teacher, sae, cfg.concepts

    def labels(self, x: torch.Tensor, windows) -> torch.Tensor:
        c = self.c
        return concept_labels(self.teacher, self.sae, x, c.layer, k_attr=c.k_attr, acts=c.acts, select=c.select)


class TableLabels:
    """Labels precomputed once (as ``concepts label`` does) and served by window id: an index on a
    host tensor and a copy to the device, the per-step work of ``CachedLabels``."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def labels(self, x: torch.Tensor, windows) -> torch.Tensor:
        rows = self.table[torch.as_tensor(windows)]
        if x.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(x.device, non_blocking=True).long()


@dataclass
class Run:
    """One method under test: its modules, optimizer and measurements."""

    key: str
    cfg: Config
    method: torch.nn.Module
    module: torch.nn.Module  # what the step calls (compiled or not)
    optimizer: torch.optim.Optimizer
    flops: float  # per token, counted for the work the step does
    teacher_flops: float
    resident: int  # bytes of weights, teacher and SAE (AdamW state is added once it exists)
    times: list[float] = field(default_factory=list)
    peak: int = 0
    saved: int = 0
    rss: int | None = None
    steps: int = 0  # optimizer steps taken (batch_inputs' step: ponder draws its n from it)
    failed: str = ""  # e.g. "out of memory": the row says so and the other methods still run


def user_overrides(args) -> dict:
    """``--set section.key=value`` options as a nested dict."""
    return parse_overrides([f"--{s}" for s in args.set])


def make_cfg(args, key: str, teacher_yaml: Path) -> Config:
    method, variant, _ = VARIANTS[key]
    base = make_config(args.config, user_overrides(args))
    over = user_overrides(args)
    for section, values in copy.deepcopy(variant).items():
        over.setdefault(section, {}).update(values)
    train = {"method": method, "device": args.device, "compile": args.compile}
    if args.batch_size:
        train["batch_size"] = args.batch_size
    if args.dtype:
        train["dtype"] = args.dtype
    over.setdefault("train", {}).update(train)
    model = over.setdefault("model", {})
    if args.seq_len:
        over.setdefault("data", {})["seq_len"] = args.seq_len
        model["block_size"] = max(base.model.block_size, args.seq_len)
    if method in ("cocomix", "kd"):
        n_layer = base.model.n_layer
        c = base.cocomix  # sizes default to tiny.yaml's SAE (C 4096, k 32), as in docs/BENCHMARKS.md
        over["teacher"] = {"path": str(teacher_yaml)}
        over["concepts"] = {"layer": min(base.concepts.layer, n_layer - 1)}
        over["cocomix"] = {"insert_layer": min(c.insert_layer, n_layer - 1),
                           "n_concepts": c.n_concepts or 4096, "k_concepts": c.k_concepts or 32}
    return make_config(args.config, over)


def state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_run(args, key: str, teacher, sae: TopKSAE, label_table: torch.Tensor, teacher_yaml: Path,
              device: torch.device) -> Run:
    cfg = make_cfg(args, key, teacher_yaml)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg).to(device).train()
    _, _, work = VARIANTS[key]
    # The trainer would load these from teacher.path / the label cache; the benchmark's are in memory.
    if work == "labels on the fly":
        method._labels = MemoryTeacherLabels(teacher, sae, cfg)
    elif work == "cached labels":
        method._labels = TableLabels(label_table)
    elif work == "teacher logits":
        method._teacher = teacher
    optimizer = build_optimizer(method, cfg.train, device)
    module = torch.compile(method) if cfg.train.compile else method
    seq = cfg.seq_len
    teacher_flops = method.teacher_flops_per_token(seq) if work in ("labels on the fly", "teacher logits") else 0.0
    resident = state_bytes(method.parameters())
    if work == "teacher logits":
        resident += state_bytes(teacher.model.parameters())
    elif work == "labels on the fly":
        resident += state_bytes(teacher.model.parameters()) + state_bytes(sae.parameters())
    return Run(key, cfg, method, module, optimizer, method.train_flops_per_token(seq) + teacher_flops,
               teacher_flops, resident)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, windows, amp) -> None:
    """One optimizer step the way the trainer makes it (grad_accum 1)."""
    extra = run.method.batch_inputs(x, y, windows=windows, step=run.steps)
    with amp:
        loss, _ = run.module(x, y, **extra)
    loss.backward()
    clip = run.cfg.train.grad_clip
    norm = torch.nn.utils.clip_grad_norm_([p for p in run.method.parameters() if p.requires_grad],
                                          clip if clip > 0 else float("inf"))
    torch.stack([loss.detach(), norm.float()]).tolist()  # the trainer's one host sync per step
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.steps += 1


def measure_saved(run: Run, x, y, windows, amp) -> int:
    extra = run.method.batch_inputs(x, y, windows=windows, step=run.steps)

    def forward():
        with amp:
            return run.method(x, y, **extra)[0]

    loss, n = saved_activation_bytes(forward, exclude=run.method.parameters())
    loss.backward()
    run.method.zero_grad(set_to_none=True)
    return n


def release(run: Run) -> None:
    """Mark ``run`` out of memory and free what it holds on the device, so the others can go on."""
    run.failed = "out of memory"
    run.optimizer.zero_grad(set_to_none=True)
    run.optimizer.state.clear()
    torch.cuda.empty_cache()


def optimizer_bytes(run: Run) -> int:
    return sum(state_bytes(v for v in s.values() if torch.is_tensor(v)) for s in run.optimizer.state.values())


def proc_status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def rss_child(args) -> None:
    """--rss-of KEY: peak RSS growth (bytes) over one warm training step of one method, as JSON:
    after a first step (lazy initialisation, AdamW state), the high-water mark is reset
    (/proc/self/clear_refs) and the second step's peak is read against the RSS before it."""
    device = torch.device("cpu")
    runs, batches = setup(args, [args.rss_of], device)
    run, amp = runs[0], autocast_context(device, runs[0].cfg.train.dtype)
    train_step(run, *batches[1], amp)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_bytes("VmRSS")
    train_step(run, *batches[0], amp)
    print(json.dumps({"rss_growth": max(0, proc_status_bytes("VmHWM") - before)}))


def setup(args, keys: list[str], device: torch.device):
    """Runs for ``keys`` and a few batches of random tokens (pinned, copied asynchronously, like the loader's)."""
    cfg = make_config(args.config, user_overrides(args))
    tmp = Path(tempfile.mkdtemp(prefix="latentlm-bench-"))
    teacher_yaml = tmp / "teacher.yaml"
    save_yaml(cfg, teacher_yaml)  # the teacher has the student's shape; its YAML is what FLOP counting reads
    base = make_cfg(args, "ntp", teacher_yaml)
    seq, batch, vocab = base.seq_len, base.train.batch_size, base.model.vocab_size
    torch.manual_seed(0)
    n_windows = 4
    tokens = torch.randint(0, vocab, (n_windows * batch, seq + 1))
    if device.type == "cuda":
        tokens = tokens.pin_memory()
    batches = []
    for i in range(n_windows):
        w = list(range(i * batch, (i + 1) * batch))
        xy = tokens[w].to(device, non_blocking=True)
        batches.append((xy[:, :-1], xy[:, 1:], w))
    needs_teacher = any(VARIANTS[k][2] != "plain" for k in keys)
    teacher = sae = table = None
    if needs_teacher:
        ccfg = make_cfg(args, "cocomix-fly", teacher_yaml)
        teacher = LatentLMTeacher.from_model(Transformer(ccfg.model), SimpleNamespace(vocab_size=vocab), device)
        sae = TopKSAE(ccfg.model.n_embd, ccfg.cocomix.n_concepts, ccfg.cocomix.k_concepts).to(device)
        labels = MemoryTeacherLabels(teacher, sae, ccfg)
        table = torch.cat([labels.labels(tokens[i * batch:(i + 1) * batch, :-1].to(device), None).cpu()
                           for i in range(n_windows)]).int()
    runs = [build_run(args, k, teacher, sae, table, teacher_yaml, device) for k in keys]
    return runs, batches


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3g}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cocomix/tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method first (compilation, caches)")
    ap.add_argument("--batch-size", type=int, default=0, help="sequences per step (default: the preset's)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the preset's)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override on top of --config, e.g. model.n_layer=8 (repeatable)")
    ap.add_argument("--methods", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--rss", action="store_true", help="CPU: also measure each method's peak RSS growth in a child")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file ('-' for stdout)")
    ap.add_argument("--plain-head", action="store_true",
                    help="compute head losses the plain way (full logits; latentlm.model.losses.fused_head(False)), "
                         "for before/after comparisons")
    ap.add_argument("--rss-of", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_head:
        losses.FUSED = False  # this process only (the --rss children get the flag too)
    if args.rss_of:
        return rss_child(args)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(VARIANTS)}")
    keys = ["ntp"] + [k for k in keys if k != "ntp"]  # NTP is every ratio's denominator
    device = torch.device(args.device)
    runs, batches = setup(args, keys, device)
    cfg = runs[0].cfg
    amp = autocast_context(device, cfg.train.dtype)
    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    ceiling = matmul_flops_ceiling(device, torch.bfloat16 if bf16 else torch.float32)
    peak = device_peak_flops(device)
    load_before = os.getloadavg()[0]

    for run in runs:
        try:
            run.saved = measure_saved(run, *batches[0], amp)
            for i in range(args.warmup):
                train_step(run, *batches[i % len(batches)], amp)
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                train_step(run, *batches[0], amp)
                run.peak = run.resident + optimizer_bytes(run) + torch.cuda.max_memory_allocated(device) - before
            else:
                run.peak = run.resident + optimizer_bytes(run) + run.saved
        except torch.cuda.OutOfMemoryError:
            release(run)
    for i in range(args.steps):  # round-robin: one step of every method per round
        for run in (r for r in runs if not r.failed):
            x, y, w = batches[i % len(batches)]
            try:
                synchronize(device)
                t0 = time.perf_counter()
                train_step(run, x, y, w, amp)
                synchronize(device)
                run.times.append(time.perf_counter() - t0)
            except torch.cuda.OutOfMemoryError:
                release(run)
    if runs[0].failed:
        sys.exit(f"ntp, every ratio's denominator, failed ({runs[0].failed}); lower --batch-size or --seq-len")
    load_after = os.getloadavg()[0]
    if args.rss and device.type == "cpu":
        for run in (r for r in runs if not r.failed):
            cmd = [sys.executable, __file__, "--rss-of", run.key, "--config", args.config, "--device", "cpu"]
            for flag, v in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--dtype", args.dtype)):
                if v:
                    cmd += [flag, str(v)]
            if args.plain_head:
                cmd.append("--plain-head")
            for s in args.set:
                cmd += ["--set", s]
            # Tensors of 64 KiB and more get their own mappings, returned to the OS when freed, so
            # the RSS high-water mark follows live tensor memory rather than glibc's cached heap.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            run.rss = json.loads(out.strip().splitlines()[-1])["rss_growth"]

    tokens = cfg.train.batch_size * cfg.seq_len
    base = runs[0]
    base_t = statistics.median(base.times)
    rows = []
    for run in runs:
        if run.failed:
            rows.append({"method": label(run.key, run.cfg), "key": run.key, "failed": run.failed})
            continue
        t = statistics.median(run.times)
        tflops = run.flops * tokens / t / 1e12
        flop_ratio = run.flops / base.flops
        rows.append({
            "method": label(run.key, run.cfg), "key": run.key, "tokens_per_s": tokens / t, "step_ms": t * 1e3,
            "flops_per_token": run.flops, "teacher_flops_per_token": run.teacher_flops, "tflops": tflops,
            "mfu_peak": tflops * 1e12 / peak if peak else None, "mfu_ceiling": tflops * 1e12 / ceiling,
            "peak_mib": run.peak / MiB, "saved_mib": run.saved / MiB,
            "rss_mib": None if run.rss is None else run.rss / MiB, "mem_vs_ntp": run.peak / base.peak,
            "step_vs_ntp": t / base_t, "flops_vs_ntp": flop_ratio, "step_vs_flops": t / base_t / flop_ratio,
        })
    m = cfg.model
    mem_kind = "max_memory_allocated + resident" if device.type == "cuda" else "resident + saved activations"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{Path(args.config).name}: {m.arch} {m.n_layer} x {m.n_embd}, vocab {m.vocab_size}, batch "
          f"{cfg.train.batch_size} x {cfg.seq_len}, {name}, dtype {'bf16 autocast' if bf16 else 'fp32'}"
          f"{', compiled' if args.compile else ''}{', plain head losses' if args.plain_head else ''}, median of {args.steps} round-robin steps; "
          f"torch {torch.__version__}; "
          f"matmul ceiling {ceiling / 1e12:.3f} TFLOP/s; peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s; "
          f"load {load_before:.2f} -> {load_after:.2f}; memory = {mem_kind}\n")
    rss_col = args.rss and device.type == "cpu"
    print("| method | tok/s | step ms | TFLOP/s | MFU (peak) | MFU (matmul ceiling) | peak MiB | saved act MiB "
          + ("| RSS growth MiB " if rss_col else "")
          + "| memory vs ntp | step vs ntp | FLOPs vs ntp | step / FLOPs vs ntp |")
    print("|---" * (12 + rss_col) + "|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['method']} | {r['failed']} " + "| - " * (10 + rss_col) + "|")
            continue
        print(f"| {r['method']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['tflops']:.3g} | "
              f"{pct(r['mfu_peak'])} | {pct(r['mfu_ceiling'])} | {r['peak_mib']:.1f} | {r['saved_mib']:.1f} | "
              + (f"{fmt(r['rss_mib'], '.1f')} | " if rss_col else "")
              + f"{r['mem_vs_ntp']:.2f} | {r['step_vs_ntp']:.2f} | {r['flops_vs_ntp']:.2f} | "
              f"{r['step_vs_flops']:.2f} |")
    if args.json:
        doc = {"config": args.config, "device": name, "torch": torch.__version__, "matmul_ceiling": ceiling,
               "peak_flops": peak, "load": [load_before, load_after], "batch_size": cfg.train.batch_size,
               "seq_len": cfg.seq_len, "steps": args.steps, "rows": rows}
        emit_json(args.json, doc)


if __name__ == "__main__":
    main()
