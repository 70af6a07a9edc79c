"""Decoding speed of every method with the KV cache against recomputing the whole prefix for each
new token, at several context lengths and batch sizes, measured in one run.

Both go through ``method.step``, the hook the one generation loop (``latentlm.generate``) calls:

- cached: the prompt of ``context`` tokens is prefilled (not timed), then each new token is one
  ``step`` of a single token per row through the cache (median over ``--new-tokens`` steps);
- recompute: what a loop without a cache pays per new token, one ``step`` over the whole
  ``context``-token prefix into a fresh cache. PonderLM-2 recomputes with its parallel Jacobi
  prefill (``ponder.prefill jacobi``: K + eval_iters + 1 passes); its exact sequential prefill
  is (K+1) x context single-slot steps, far slower still.

Prints one markdown table: per-token times, cached tokens/s, the cache's speedup, each method's
cached decode step relative to NTP's at the same context and batch, and the ratio its FLOPs
predict (``infer_flops_per_token``: the slots a decoded token runs, attention over the cache).

    python benchmarks/generate_throughput.py --contexts 128,512,1024 --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from latentlm.config import make_config
from latentlm.methods import build_method
from latentlm.methods.base import Method
from latentlm.perf import emit_json, synchronize

ROOT = Path(__file__).resolve().parent.parent

# key: (method, config overrides); K of pause/loop/ponderlm is the preset's pause.n_pauses / loop.n_loops /
# ponderlm.n_steps.
VARIANTS: dict[str, tuple[str, dict]] = {
    "ntp": ("ntp", {}),
    "cocomix": ("cocomix", {}),
    "kd": ("kd", {}),
    "pause": ("pause", {}),
    "ponder1": ("ponder", {"ponder": {"n_thoughts": 1, "prefill": "jacobi"}}),
    "ponder2": ("ponder", {"ponder": {"n_thoughts": 2, "prefill": "jacobi"}}),
    "loop": ("loop", {}),
    "ponderlm": ("ponderlm", {}),
}


# The config key holding each method's K (thoughts / pauses / extra passes / pondering steps per token).
K_KEYS = {"ponder": ("ponder", "n_thoughts"), "pause": ("pause", "n_pauses"), "loop": ("loop", "n_loops"),
          "ponderlm": ("ponderlm", "n_steps")}


def method_k(cfg, name: str) -> int:
    section, key = K_KEYS[name]
    return getattr(getattr(cfg, section), key)


def build(args, key: str, capacity: int, device: torch.device) -> tuple[str, Method]:
    name, over = VARIANTS[key]
    base = make_config(args.config)
    over = {**over, "train": {"method": name},
            "model": {"block_size": max(base.model.block_size, capacity)}}  # learned positions must reach
    if name == "cocomix":
        c = base.cocomix  # sizes default to tiny.yaml's SAE (C 4096, k 32), as in docs/BENCHMARKS.md
        over["cocomix"] = {"insert_layer": min(c.insert_layer, base.model.n_layer - 1),
                           "n_concepts": c.n_concepts or 4096, "k_concepts": c.k_concepts or 32}
    cfg = make_config(args.config, over)
    torch.manual_seed(0)
    method = build_method(cfg).to(device).eval()
    label = f"{name} (K={method_k(cfg, name)})" if name in K_KEYS else name
    return label, method


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def measure(method: Method, prompt: torch.Tensor, new_tokens: int, reps: int,
            device: torch.device) -> tuple[float, float]:
    """(recompute seconds per new token, cached seconds per new token) for ``prompt`` [B, T]."""
    b, t = prompt.shape
    pos = torch.arange(t, device=device)[None].expand(b, -1)
    valid = torch.ones(b, t, dtype=torch.bool, device=device)
    one = torch.ones(b, 1, dtype=torch.bool, device=device)

    def recompute():
        method.step(prompt, pos, valid, method.new_cache(b, t))[:, -1].argmax(-1)

    recompute()  # warm-up
    full = statistics.median(timed(recompute, device) for _ in range(reps))
    cache = method.new_cache(b, t + new_tokens + 1)
    nxt = method.step(prompt, pos, valid, cache)[:, -1].argmax(-1)
    steps = []
    for i in range(new_tokens + 1):  # the first step warms up
        p = torch.full((b, 1), t + i, device=device)

        def decode():
            nonlocal nxt
            nxt = method.step(nxt[:, None], p, one, cache)[:, -1].argmax(-1)

        steps.append(timed(decode, device))
    return full, statistics.median(steps[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cocomix/tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="128,512,1024")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=8, help="timed cached decode steps (median reported)")
    ap.add_argument("--reps", type=int, default=1, help="timed full recomputes (median reported)")
    ap.add_argument("--methods", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file ('-' for stdout)")
    args = ap.parse_args()
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(VARIANTS)}")
    keys = ["ntp"] + [k for k in keys if k != "ntp"]  # the decode-step ratios' denominator
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    device = torch.device(args.device)
    capacity = max(contexts) + args.new_tokens + 2
    load_before = os.getloadavg()[0]
    rows, ntp_step, ntp_flops = [], {}, {}
    for key in keys:
        label, method = build(args, key, capacity, device)
        vocab = method.model.cfg.vocab_size
        for ctx in contexts:
            for b in batches:
                torch.manual_seed(ctx * 1000 + b)
                prompt = torch.randint(0, vocab, (b, ctx), device=device)
                full, cached = measure(method, prompt, args.new_tokens, args.reps, device)
                flops = method.infer_flops_per_token(ctx)
                if key == "ntp":
                    ntp_step[ctx, b], ntp_flops[ctx] = cached, flops
                rows.append({"method": label, "key": key, "context": ctx, "batch": b, "recompute_ms": full * 1e3,
                             "cached_ms": cached * 1e3, "cached_tokens_per_s": b / cached, "speedup": full / cached,
                             "decode_vs_ntp": cached / ntp_step[ctx, b], "flops_vs_ntp": flops / ntp_flops[ctx]})
    load_after = os.getloadavg()[0]
    cfg = make_config(args.config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{Path(args.config).name}: {cfg.model.arch} {cfg.model.n_layer} x {cfg.model.n_embd}, vocab "
          f"{cfg.model.vocab_size}, {name}, fp32, torch {torch.__version__}; cached = median of {args.new_tokens} "
          f"decode steps, recompute = median of {args.reps}; load {load_before:.2f} -> {load_after:.2f}\n")
    print("| method | context | batch | recompute ms/token | cached ms/token | cached tok/s | cache speedup "
          "| decode step vs ntp | decode FLOPs vs ntp |")
    print("|---" * 9 + "|")
    for r in rows:
        print(f"| {r['method']} | {r['context']} | {r['batch']} | {r['recompute_ms']:.1f} | {r['cached_ms']:.2f} | "
              f"{r['cached_tokens_per_s']:,.0f} | {r['speedup']:.1f} | {r['decode_vs_ntp']:.2f} | "
              f"{r['flops_vs_ntp']:.2f} |")
    if args.json:
        emit_json(args.json, {"config": args.config, "device": name, "torch": torch.__version__,
                              "load": [load_before, load_after], "rows": rows})


if __name__ == "__main__":
    main()
