"""latentlm's NTP training step next to the libraries a user would pick instead, measured side by side.

One optimizer step (forward, backward, gradient clipping to 1.0, the host read of [loss, grad norm],
AdamW) of the same model in each library, at the same shape, parameter count and optimizer:

- ``gpt2`` rows: latentlm ``arch gpt2`` vs Hugging Face ``GPT2LMHeadModel`` and litgpt ``GPT``
  (LayerNorm, GELU MLP, biases, tied embeddings; litgpt has no learned positions, so its model uses
  RoPE on a quarter of each head, as its GPT-NeoX-style configs do, and lacks the ``T x d`` position table);
- ``llama`` rows: latentlm ``arch llama`` vs ``LlamaForCausalLM`` and litgpt ``GPT`` with RMSNorm,
  SwiGLU (``LLaMAMLP``), full RoPE, untied, no biases.

Each library computes its loss its own way: latentlm the trainer's (``method(x, y)``), Hugging Face
``model(input_ids=x, labels=y, shift_labels=y)``, litgpt its pretraining script's
``chunked_cross_entropy(model(x), y)``. Every model gets the same AdamW (latentlm's
``build_optimizer``: decay on matrices; fused on CUDA), the same random tokens, float32 or bf16
autocast, and optionally ``torch.compile``. Models are timed round-robin (one step of each per
round; median over rounds), per vocabulary and thread count. litgpt is optional: without it its
column says why. ``--ab`` adds latentlm with the plain (unfused) head loss, for before/after.

    python benchmarks/peer_train.py                                   # CPU: vocab 50257 and 8192, 1 and 2 threads
    python benchmarks/peer_train.py --device cuda --dtype bfloat16 --compile --seq-len 1024 --batch-size 16 \\
        --n-layer 12 --n-embd 768 --n-head 12 --threads 0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from latentlm.config import make_config
from latentlm.methods import build_method
from latentlm.model import losses
from latentlm.perf import emit_json, synchronize
from latentlm.train.optim import build_optimizer
from latentlm.train.trainer import autocast_context


@dataclass
class Entry:
    """One model under test: how to take a step, and its timings."""

    name: str
    params: int
    step: Callable[[], None]
    times: list[float] = field(default_factory=list)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def make_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], train_cfg, device, amp,
              context=None) -> Callable[[], None]:
    """The trainer's step (grad_accum 1) for any model: loss, backward, clip, one host sync, AdamW."""
    opt = build_optimizer(model, train_cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with amp, (context() if context else contextlib.nullcontext()):
            loss = loss_fn()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.stack([loss.detach().float(), norm.float()]).tolist()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def latentlm_model(arch: str, a, vocab: int, device):
    cfg = make_config(base={"model": {"arch": arch, "vocab_size": vocab, "block_size": a.seq_len,
                                      "n_layer": a.n_layer, "n_head": a.n_head, "n_embd": a.n_embd},
                            "train": {"method": "ntp", "device": str(device)}})
    torch.manual_seed(0)
    return build_method(cfg).to(device).train(), cfg


def hf_model(arch: str, a, vocab: int, ffn: int, device):
    import transformers

    if arch == "gpt2":
        conf = transformers.GPT2Config(vocab_size=vocab, n_positions=a.seq_len, n_embd=a.n_embd, n_layer=a.n_layer,
                                       n_head=a.n_head, n_inner=ffn, activation_function="gelu_new",
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                       bos_token_id=None, eos_token_id=None)
        cls = transformers.GPT2LMHeadModel
    else:
        conf = transformers.LlamaConfig(vocab_size=vocab, hidden_size=a.n_embd, intermediate_size=ffn,
                                        num_hidden_layers=a.n_layer, num_attention_heads=a.n_head,
                                        num_key_value_heads=a.n_head, max_position_embeddings=a.seq_len,
                                        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                                        mlp_bias=False, rope_theta=10000.0, bos_token_id=None,
                                        eos_token_id=None, pad_token_id=None)
        cls = transformers.LlamaForCausalLM
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(conf).to(device).train()


def litgpt_model(arch: str, a, vocab: int, ffn: int, device):
    from litgpt.config import Config
    from litgpt.model import GPT

    common = dict(block_size=a.seq_len, n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, vocab_size=vocab,
                  padded_vocab_size=vocab, intermediate_size=ffn, parallel_residual=False, norm_eps=1e-5)
    if arch == "gpt2":
        conf = Config(**common, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True,
                      gelu_approximate="tanh", rotary_percentage=0.25)
    else:
        conf = Config(**common, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", bias=False,
                      rotary_percentage=1.0)
    torch.manual_seed(0)
    model = GPT(conf)
    # GPT() keeps torch's default inits (embeddings N(0, 1)); litgpt's pretraining re-initialises every
    # model. Its own N(0, 0.02) here, the other columns' distribution. Without it, the tied N(0, 1) head
    # saturates the softmax within two AdamW steps and the steps crawl on denormal gradients (0.2 s ->
    # 45 s per step on CPU).
    model.apply(model._init_weights)
    model = model.to(device).train()
    if arch == "gpt2":
        model.lm_head.weight = model.transformer.wte.weight  # GPT-2 ties them; litgpt's configs do not
    return model


def litgpt_missing() -> str | None:
    try:
        import litgpt.model  # noqa: F401
        from litgpt.utils import chunked_cross_entropy  # noqa: F401
    except Exception as e:  # ImportError, or a broken install of one of its dependencies
        return f"litgpt not importable ({type(e).__name__}: {str(e).splitlines()[0][:60]}); pip install litgpt"
    return None


def build_entries(arch: str, vocab: int, a, device, x, y, amp) -> tuple[list[Entry], dict[str, str]]:
    entries, skipped = [], {}
    method, cfg = latentlm_model(arch, a, vocab, device)
    ffn = cfg.model.resolved().ffn_hidden
    module = torch.compile(method) if a.compile else method
    entries.append(Entry("latentlm", count(method), make_step(method, lambda: module(x, y)[0], cfg.train, device, amp)))
    if a.ab:
        entries.append(Entry("latentlm (plain head)", count(method),
                             make_step(method, lambda: module(x, y)[0], cfg.train, device, amp,
                                       context=lambda: losses.fused_head(False))))
    try:
        hf = hf_model(arch, a, vocab, ffn, device)
        hf_mod = torch.compile(hf) if a.compile else hf
        entries.append(Entry("transformers", count(hf), make_step(
            hf, lambda: hf_mod(input_ids=x, labels=y, shift_labels=y).loss, cfg.train, device, amp)))
    except ImportError as e:
        skipped["transformers"] = f"transformers not importable ({e}); pip install transformers"
    why = litgpt_missing()
    if why:
        skipped["litgpt"] = why
    else:
        from litgpt.utils import chunked_cross_entropy

        lit = litgpt_model(arch, a, vocab, ffn, device)
        lit_mod = torch.compile(lit) if a.compile else lit
        entries.append(Entry("litgpt", count(lit), make_step(
            lit, lambda: chunked_cross_entropy(lit_mod(x), y), cfg.train, device, amp)))
    return entries, skipped


def measure(entries: list[Entry], rounds: int, warmup: int, device) -> None:
    for e in entries:
        for _ in range(warmup):
            e.step()
    for _ in range(rounds):  # round-robin: load drift hits every library alike
        for e in entries:
            synchronize(device)
            t0 = time.perf_counter()
            e.step()
            synchronize(device)
            e.times.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="gpt2,llama")
    ap.add_argument("--vocabs", default="50257,8192")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts to run (0 = leave torch's default)")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--ab", action="store_true", help="also time latentlm with the plain (unfused) head loss")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file ('-' for stdout)")
    a = ap.parse_args()
    device = torch.device(a.device)
    amp = autocast_context(device, a.dtype)
    rows = []
    load = [os.getloadavg()[0]]
    peers = ["transformers", "litgpt"]
    names = ["latentlm"] + (["latentlm (plain head)"] if a.ab else []) + peers
    print(f"NTP training step, {a.n_layer} x {a.n_embd} ({a.n_head} heads), batch {a.batch_size} x {a.seq_len}, "
          f"{a.device}, {a.dtype}{', compiled' if a.compile else ''}; torch {torch.__version__}; median of "
          f"{a.rounds} round-robin steps\n")
    print("| arch | vocab | threads | params (latentlm / peers) | " + " | ".join(f"{n} ms" for n in names)
          + " | latentlm / fastest peer |")
    print("|---" * (5 + len(names)) + "|")
    g = torch.Generator().manual_seed(0)
    for arch in a.archs.split(","):
        for vocab in (int(v) for v in a.vocabs.split(",")):
            xy = torch.randint(0, vocab, (a.batch_size, a.seq_len + 1), generator=g).to(device)
            x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
            entries, skipped = build_entries(arch, vocab, a, device, x, y, amp)
            for threads in (int(t) for t in a.threads.split(",")):
                if threads:
                    torch.set_num_threads(threads)
                for e in entries:
                    e.times = []
                measure(entries, a.rounds, a.warmup, device)
                med = {e.name: statistics.median(e.times) * 1e3 for e in entries}
                peer_ms = [med[n] for n in peers if n in med]
                ratio = med["latentlm"] / min(peer_ms) if peer_ms else float("nan")
                cells = [f"{med[n]:.1f}" if n in med else f"- ({skipped.get(n, 'not run')})" for n in names]
                params = " / ".join(f"{e.params / 1e6:.2f}M" for e in entries if e.name != "latentlm (plain head)")
                print(f"| {arch} | {vocab} | {threads or torch.get_num_threads()} | {params} | " + " | ".join(cells)
                      + f" | {ratio:.2f} |", flush=True)
                rows.append({"arch": arch, "vocab": vocab, "threads": threads or torch.get_num_threads(),
                             "ms": med, "params": {e.name: e.params for e in entries}, "skipped": skipped,
                             "latentlm_vs_fastest_peer": ratio})
            del entries
            gc.collect()
    load.append(os.getloadavg()[0])
    print(f"\nload average {load[0]:.2f} -> {load[1]:.2f}. latentlm's parameter count includes the vocabulary rows "
          "padded to a multiple of 64 (they never score); the gpt2-style litgpt model has no position table.")
    if a.json:
        emit_json(a.json, {"device": a.device, "dtype": a.dtype, "compile": a.compile, "torch": torch.__version__,
                           "shape": {"n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head,
                                     "seq_len": a.seq_len, "batch_size": a.batch_size},
                           "load": load, "rows": rows})


if __name__ == "__main__":
    main()
