"""How much each difference between latentlm and the authors' PonderLM / PonderLM-2 code matters, on
tiny models (docs/PONDER.md, "Differences from the authors' code").

For every difference: two configs that differ only in it (latentlm's default, and the authors'
side where latentlm has an option for it), the same seed and data order. Measured: the largest
logit difference of the two freshly initialised models on one validation batch (where the two
compute different functions of the same weights), and the validation loss of each after the same
short training with the real trainer. A last row trains the same config with two seeds: the loss
noise the other differences should be read against. Prints one markdown table.

    python benchmarks/ponder_fidelity.py                    # byte-level Wikipedia, 2 x 64 llama, 150 steps
    python benchmarks/ponder_fidelity.py --only pause_scale,noise --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from latentlm.config import make_config
from latentlm.data.loader import TokenSplit
from latentlm.data.prepare import prepare
from latentlm.data.tokenizers import ByteTokenizer, load_tokenizer
from latentlm.loading import load_method
from latentlm.methods import build_method
from latentlm.train import trainer
from latentlm.train.trainer import train

D = 64
SQRT_D, SQRT_25D = math.sqrt(D), math.sqrt(2.5 * D)
# The ponder/tiny preset (its init: trunc_normal; embed_scale sqrt(2.5 d)) shrunk for byte-level text.
BASE = {"model": {"vocab_size": 257, "block_size": 64, "n_layer": 2, "n_embd": D, "n_head": 4,
                  "embed_scale": SQRT_25D},
        "data": {"seq_len": 64},
        "train": {"batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "eval_every": 0,
                  "eval_batches": 8, "ckpt_every": 0, "log_every": 10, "progress": False, "device": "cpu"}}


K3 = {"ponderlm": {"n_steps": 3}}
# key: (what differs, method, latentlm's side, the authors' side, compare logits at init)
ROWS = {
    "ponderlm_update": ("ponderlm K=3: step added to the previous input (PonderLM v1, ours) or to e(0) "
                        "(the PonderLM-2 repo's baseline, its Table 3)", "ponderlm",
                        K3, {"ponderlm": {"n_steps": 3, "update": "from_e0"}}, True),
    "ponderlm_start": ("ponderlm K=3: start from e(0) (ours, v1's 70M/160M runs) or K e(0) (v1's 410M+ runs)",
                       "ponderlm", K3, {"ponderlm": {"n_steps": 3, "multiply_start": True}}, True),
    "ponderlm_scale": ("ponderlm K=3: token (and mixture) scale sqrt(2.5 d) (one model.embed_scale, ours) "
                       "or sqrt(d) (both official codes' ponderlm)", "ponderlm",
                       K3, {**K3, "model": {"embed_scale": SQRT_D}}, True),
    "pause_scale": ("pause K=1: token and pause scale sqrt(2.5 d) (ours) or sqrt(d) (the authors' pause)",
                    "pause", {}, {"model": {"embed_scale": SQRT_D}}, True),
    "interp_scale": ("ponder, interpolated thoughts: scale sqrt(2.5 d) (ours) or sqrt(d) (the authors' "
                     "interpolation ablation)", "ponder", {"ponder": {"thought": "interpolate"}},
                     {"ponder": {"thought": "interpolate"}, "model": {"embed_scale": SQRT_D}}, True),
    "vanilla_init": ("ntp: the methods' init and scale (ours) or Hugging Face's Normal(0, 0.02), no depth "
                     "scaling, no embedding scale (the authors' vanilla control)", "ntp",
                     {}, {"model": {"init": "hf_normal", "init_std": 0.02, "embed_scale": 1.0}}, False),
    "padded_vocab": ("ponderlm K=3: softmax / loss over the real vocabulary (ours) or over all rows, 63 "
                     "never-seen padded ones included (official: 47 of 50304)", "ponderlm",
                     K3, {**K3, "model": {"vocab_size": 320}}, False),
    "norm_eps": ("ponder K=1: RMSNorm eps 1e-5 (ours) or 1e-1 (the official configs)", "ponder",
                 {}, {"model": {"norm_eps": 0.1}}, True),
    "table3_k": ("loop: K=1 like every method in the presets (ours) or K=3 (Table 3's scripts for "
                 "pause, loop, ponderlm)", "loop", {}, {"loop": {"n_loops": 3}}, False),
    "weight_decay": ("ponderlm K=3: weight decay 0.1 (the presets) or 0.01 (Table 3's ponderlm and "
                     "vanilla scripts)", "ponderlm", K3, {**K3, "train": {"weight_decay": 0.01}}, False),
    # changed to match the authors in issue 13: latentlm before (the authors' side column holds the old one)
    "old_ponderlm": ("changed: ponderlm K=3, latentlm before this change (update from_e0, mixture at "
                     "sqrt(d)) vs now", "ponderlm", K3,
                     {"ponderlm": {"n_steps": 3, "update": "from_e0", "mix_scale": "sqrt_d"}}, True),
    "old_pause": ("changed: pause K=3, one token repeated (now) vs K vectors (before)", "pause",
                  {"pause": {"n_pauses": 3}}, {"pause": {"n_pauses": 3, "shared": False}}, False),
    "old_init": ("changed: ponder K=1, the presets' init (trunc_normal) vs before (Normal(0, 0.02))",
                 "ponder", {}, {"model": {"init": "normal", "init_std": 0.02}}, False),
    "noise": ("noise: ntp, train.seed 1337 vs 1338 (init and data order)", "ntp", {},
              {"train": {"seed": 1338}}, False),
}


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def config(method: str, over: dict, data: Path, out: Path, steps: int):
    base = merge(BASE, {"data": {"path": str(data)}, "train": {"method": method, "out_dir": str(out),
                                                                "max_steps": steps}})
    return make_config("ponder/tiny", merge(base, over))


@contextlib.contextmanager
def unused_vocab_rows(rows: int):
    """Let a model have ``rows`` vocabulary rows, more than the byte tokenizer's 257 (rows no token
    ever uses, as the official 50304-row heads over the GPT-NeoX tokenizer have): while the row's runs
    train, the trainer checks the tokenizer's identity only, and the unused ids count 0 bytes."""
    check, lengths = trainer.check_tokenizer, ByteTokenizer.token_byte_lengths
    trainer.check_tokenizer = lambda data, tok, vocab_size=None: check(data, tok)
    ByteTokenizer.token_byte_lengths = lambda self: np.pad(lengths(self), (0, rows - 257))
    try:
        yield
    finally:
        trainer.check_tokenizer, ByteTokenizer.token_byte_lengths = check, lengths


def trained(cfg, done: dict) -> float:
    """The validation loss of ``cfg`` after training; a config already trained (another row's
    latentlm side) is not trained again."""
    key = yaml.safe_dump({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "out_dir": ""}})
    if key not in done:
        done[key] = train(cfg)["val_loss"]
    return done[key]


def init_gap(cfg_a, cfg_b, x: torch.Tensor) -> float:
    """max |logits| difference of the two methods built from the same seed (same weights when their
    shapes agree), on ``x``."""
    logits = []
    for cfg in (cfg_a, cfg_b):
        torch.manual_seed(cfg_a.train.seed)
        m = build_method(cfg).eval()
        with torch.no_grad():
            logits.append(m.eval_logits(x))
    return float((logits[0] - logits[1]).abs().max())


def prefill_gap(method, x: torch.Tensor) -> tuple[float, float]:
    """The official generation prefills a prompt by Jacobi iteration (n = 3), latentlm's default
    prefill is exact: max |logit| difference and mean NLL difference (Jacobi - exact) over ``x``."""
    with torch.no_grad():
        exact = method.exact_logits(x)
        jacobi, _ = method.jacobi_logits(x, 3)
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 1:].flatten())  # noqa: E731
    return float((exact - jacobi).abs().max()), float(nll(jacobi) - nll(exact))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--only", default="", help="comma-separated row keys: " + ", ".join([*ROWS, "prefill"]))
    ap.add_argument("--data", default="", help="prepared token shards (default: byte-level Wikipedia, 400 documents)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: a second thread only spins on a shared machine
    keys = [k for k in a.only.split(",") if k] or [*ROWS, "prefill"]
    unknown = [k for k in keys if k not in ROWS and k != "prefill"]
    if unknown:
        ap.error(f"unknown row {unknown[0]!r}; choose from {', '.join([*ROWS, 'prefill'])}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(a.data) if a.data else tmp / "data"
        if not a.data:
            prepare("wiki", load_tokenizer("byte"), data, val_fraction=0.05, limit=400, workers=1, progress=False)
        x = torch.from_numpy(TokenSplit(data, "val").get(0, 8 * 64).astype("int64")).view(8, 64)
        print(f"llama {BASE['model']['n_layer']} x {D}, byte vocabulary, {a.steps} steps of 8 x 64 tokens, "
              f"val loss on {BASE['train']['eval_batches']} batches; loss diff = authors' side - ours\n")
        print("| difference | max logit gap at init | val loss, ours | val loss, other side | diff |")
        print("|---|---:|---:|---:|---:|")
        done: dict[str, float] = {}
        for key in (k for k in keys if k in ROWS):
            what, method, ours, theirs, gap = ROWS[key]
            cfgs = [config(method, o, data, tmp / f"{key}-{i}", a.steps) for i, o in enumerate((ours, theirs))]
            g = f"{init_gap(*cfgs, x):.3f}" if gap else "-"
            with unused_vocab_rows(320) if key == "padded_vocab" else contextlib.nullcontext():
                losses = [trained(c, done) for c in cfgs]
            print(f"| {what} | {g} | {losses[0]:.4f} | {losses[1]:.4f} | {losses[1] - losses[0]:+.4f} |", flush=True)
        if "prefill" in keys:
            cfg = config("ponder", {}, data, tmp / "prefill", a.steps)
            torch.manual_seed(cfg.train.seed)
            (g0, n0), _ = prefill_gap(build_method(cfg).eval(), x), train(cfg)
            g1, n1 = prefill_gap(load_method(tmp / "prefill")[0], x)
            print(f"| ponder K=1: prompt prefill exact (ours) vs Jacobi n=3 (the official generation), 64-token "
                  f"prompts: max logit gap and NLL(Jacobi) - NLL(exact), at init / after {a.steps} steps | "
                  f"{g0:.2e} / {g1:.2e} | - | - | {n0:+.1e} / {n1:+.1e} |")

if __name__ == "__main__":
    main()
