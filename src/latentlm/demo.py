"""The embedded-default run behind ``make demo``.

On the Wikipedia lead sections shipped offline: train a byte-level BPE tokenizer (8192 ids) on
the corpus, prepare token shards, train a small NTP model for a few minutes on CPU, evaluate it
on the held-out split, print a sample, and write everything (tokenizer, data, checkpoints,
metrics, ``summary.json``) under one run directory. Re-running reuses what is already there.

Why not GPT-2's 50k vocabulary: at this model size its LM head would be ~90% of the compute,
so a 2-core CPU would spend the demo's minutes on the softmax instead of the model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from latentlm.config import make_config
from latentlm.errors import LatentLMError

# Small enough for about four minutes of training on 2 CPU cores (see docs/RESULTS.md).
DEMO_CONFIG = {
    "model": {"arch": "gpt2", "vocab_size": 8192, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 192},
    "train": {"method": "ntp", "batch_size": 16, "max_steps": 700, "lr": 2e-3, "min_lr": 2e-4,
              "warmup_steps": 50, "eval_every": 200, "eval_batches": 16, "ckpt_every": 200,
              "log_every": 20, "weight_decay": 0.1, "seed": 1337},
}
PROMPT = "The history of science"


def run_demo(out: str | Path = "runs/demo") -> dict:
    from latentlm.data.loader import TokenSplit
    from latentlm.data.prepare import load_manifest, prepare
    from latentlm.data.sources import iter_documents
    from latentlm.data.tokenizers import load_tokenizer, train_bpe
    from latentlm.eval.perplexity import evaluate_tokens
    from latentlm.generate import generate
    from latentlm.train.checkpoint import latest_checkpoint, load_method
    from latentlm.train.trainer import train

    out = Path(out)
    data, run = out / "data", out / "ntp"
    t0 = time.perf_counter()
    tok_path = out / "tokenizer.json"
    print(f"[1/5] training a byte-level BPE tokenizer on the embedded Wikipedia corpus -> {tok_path}", flush=True)
    if tok_path.is_file():
        tokenizer = load_tokenizer("bpe", tok_path)
        print("      already trained; reusing it")
    else:
        tokenizer = train_bpe(iter_documents("wiki"), DEMO_CONFIG["model"]["vocab_size"], tok_path)
    print(f"[2/5] preparing token shards -> {data}", flush=True)
    try:
        load_manifest(data)
        print("      already prepared; reusing it")
    except LatentLMError:
        prepare("wiki", tokenizer, data, val_fraction=0.02, overwrite=True)
    t_prep = time.perf_counter() - t0

    print(f"[3/5] training a small GPT-2-style model -> {run}", flush=True)
    cfg = make_config(base=DEMO_CONFIG, overrides={"data": {"path": str(data)}, "train": {"out_dir": str(run)}})
    t1 = time.perf_counter()
    done = latest_checkpoint(run)
    if done is None or int(done.name.split("_")[1]) < cfg.train.max_steps:
        result = train(cfg, resume=done is not None)
    else:
        print("      already trained; reusing it")
        result = json.loads((run / "final.json").read_text())
    t_train = time.perf_counter() - t1

    print("[4/5] evaluating on the whole held-out split", flush=True)
    method, cfg, _ = load_method(run)
    ev = evaluate_tokens(method, TokenSplit(data, "val"), seq_len=cfg.seq_len, batch_size=16,
                         byte_lengths=tokenizer.token_byte_lengths(), progress=True)
    print(f"      val loss {ev['loss']:.4f}  ppl {ev['ppl']:.2f}  bits/byte {ev['bpb']:.4f}  "
          f"({ev['tokens']:,} tokens)")

    print("[5/5] sampling (KV cache, temperature 0.8, top-k 40)", flush=True)
    new = generate(method, [tokenizer.encode(PROMPT)], max_new_tokens=60, temperature=0.8, top_k=40,
                   eot_id=tokenizer.eot_id, seed=0)[0]
    sample = PROMPT + tokenizer.decode(new)
    print("      " + sample.replace("\n", "\n      "))

    summary = {"val_loss": ev["loss"], "val_ppl": ev["ppl"], "val_bpb": ev["bpb"], "val_tokens": ev["tokens"],
               "train_tok_per_s": result.get("tok_per_s"), "train_tokens": result.get("tokens"),
               "params": method.model.num_params(), "prepare_s": round(t_prep, 1), "train_s": round(t_train, 1),
               "total_s": round(time.perf_counter() - t0, 1), "sample": sample, "run_dir": str(run)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['total_s']:.0f}s; summary in {out / 'summary.json'}")
    return summary
