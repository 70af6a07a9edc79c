"""Training cost of each method relative to plain next-token prediction, measured in one run.

For every method on one model shape: predicted training FLOPs per token (the method's own
formula), the measured time of a training step (forward + backward + AdamW), and the bytes of
activations autograd keeps for the backward pass (counted exactly through saved-tensor hooks,
deduplicated by storage), each divided by NTP's. Prints one markdown table.

    python benchmarks/method_costs.py                       # tiny shape, CPU
    python benchmarks/method_costs.py --device cuda --n-embd 768 --n-layer 12 --seq-len 1024 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentlm.config import make_config
from latentlm import perf
from latentlm.methods import build_method, methods

# (label, method, overrides): the PonderLM-2 comparison family at K = 1 unless stated.
RUNS = [
    ("ntp", "ntp", {}),
    ("ntp, 2x depth", "ntp", {"model": {"double_depth": True}}),
    ("pause (K=1)", "pause", {}),
    ("loop (K=1)", "loop", {}),
    ("ponderlm (K=1)", "ponderlm", {}),
    ("ponder (K=1)", "ponder", {}),
    ("ponder (K=1), checkpoint=pass", "ponder", {"ponder": {"checkpoint": "pass"}}),
    ("ponder (K=2)", "ponder", {"ponder": {"n_thoughts": 2}}),
]


def saved_activation_bytes(method, x, y) -> int:
    """Bytes of distinct storages autograd saves for backward during one training forward (step 0's inputs)."""
    extra = method.batch_inputs(x, y, windows=None, step=0)
    loss, n = perf.saved_activation_bytes(lambda: method(x, y, **extra)[0], exclude=method.parameters())
    loss.backward()
    method.zero_grad(set_to_none=True)
    return n


def step_seconds(method, x, y, steps: int, device: torch.device) -> float:
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):  # the first step warms up and is not counted
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = method(x, y, **method.batch_inputs(x, y, windows=None, step=i))  # as the trainer calls it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama", choices=["gpt2", "llama", "neox"])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), device=device)
    x, y = x[:, :-1], x[:, 1:]
    rows = []
    base = None
    for label, name, over in RUNS:
        if name not in methods():
            continue
        model = {"arch": a.arch, "n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head,
                 "vocab_size": a.vocab, "block_size": a.seq_len, "embed_scale": (2.5 * a.n_embd) ** 0.5}
        extra = dict(over)
        if extra.get("model", {}).pop("double_depth", False):
            model["n_layer"] *= 2
            extra.pop("model")
        cfg = make_config(base={"model": model, "train": {"method": name}, **extra})
        torch.manual_seed(0)
        method = build_method(cfg).to(device).train()
        flops = method.train_flops_per_token(a.seq_len)
        act = saved_activation_bytes(method, x, y) / x.numel()
        sec = step_seconds(method, x, y, a.steps, device)
        if base is None:
            base = (flops, sec, act)
        rows.append((label, flops / base[0], sec / base[1], act / base[2], act, sec))
    print(f"{a.arch} {a.n_layer} x {a.n_embd}, vocab {a.vocab}, {a.batch} x {a.seq_len} tokens, {device} "
          f"({torch.get_num_threads()} threads), median of {a.steps} steps\n")
    print("| method | FLOPs/token vs ntp (predicted) | step time vs ntp (measured) | activation bytes vs ntp (measured) "
          "| activation KiB/token | step ms |")
    print("|---|---|---|---|---|---|")
    for label, f, t, m, act, sec in rows:
        print(f"| {label} | {f:.2f} | {t:.2f} | {m:.2f} | {act / 1024:.1f} | {sec * 1e3:.0f} |")


if __name__ == "__main__":
    main()
