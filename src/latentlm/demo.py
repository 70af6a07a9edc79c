"""The embedded-default comparison behind ``make demo``.

On the Wikipedia lead sections shipped offline: train a byte-level BPE tokenizer (8192 ids),
prepare token shards, train NTP, CoCoMix and PonderLM-2 students on the same tokens in the same
order, evaluate them the same way (held-out bits per byte, zero-shot tasks) and write ``report.md``
with plots. CoCoMix's teacher is the NTP run itself (``teacher: {run: ntp}``): it is trained first,
a TopK SAE is trained on its residual stream, and the CoCoMix student learns that model's concepts,
so no separate teacher is trained and CoCoMix gets no model stronger than its NTP baseline. It is
``latentlm compare`` on :data:`DEMO_EXPERIMENT` (written to ``experiment.yaml`` in the output
directory, so the run can be edited and repeated). Re-running reuses every finished stage.

Why not GPT-2's 50k vocabulary: at this model size its LM head would be ~90% of the compute,
so a 2-core CPU would spend the demo's minutes on the softmax instead of the model.
Why on-the-fly concept labels (``labels: false``): each student sees about a sixth of the training
windows, so labelling the whole split ahead would cost six times the labels CoCoMix uses.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import yaml

from latentlm.compare import run_compare
from latentlm.errors import LatentLMError
from latentlm.eval.tasks import data_root
from latentlm.fileio import write_json_atomic, write_text_atomic
from latentlm.generate import generate
from latentlm.loading import checkpoint_tokenizer, load_method

# Sized to finish within 12 minutes on 2 CPU cores, setup included (measured 7 min 19 s: docs/RESULTS.md). The
# students share one core: llama-style (RoPE, RMSNorm, SwiGLU, untied) with PonderLM-2's embedding scale
# sqrt(2.5 d), which ponder needs (its thoughts are final-normed states, far larger than raw token
# embeddings) and which its paper gives every baseline too.
STUDENT = {"arch": "llama", "vocab_size": 8192, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128,
           "embed_scale": math.sqrt(2.5 * 128)}
DEMO_EXPERIMENT = {
    "name": "latentlm demo: NTP vs CoCoMix vs PonderLM-2 at equal tokens",
    "data": {"source": "wiki", "tokenizer": "bpe", "vocab_size": 8192, "val_fraction": 0.02},
    "base": {"model": STUDENT,
             "train": {"batch_size": 8, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30, "eval_batches": 16,
                       "log_every": 20, "seed": 1337},
             "cocomix": {"insert_layer": 1}},
    "budget": {"tokens": 8 * 128 * 200},
    "teacher": {"run": "ntp"},
    "sae": {"layer": 1, "latents": 2048, "k": 16, "steps": 200, "batch_tokens": 4096, "eval_tokens": 20_000},
    "labels": False,
    "eval": {"tokens": None, "points": 4, "limit": 50, "batch_size": 32,
             "tasks": ["hellaswag", "piqa", "siqa", "arc_easy", "arc_challenge", "winogrande", "sciq", "lambada"]},
    "runs": {"ntp": {"method": "ntp"},
             "cocomix": {"method": "cocomix"},
             "ponder": {"method": "ponder"}},
}
PROMPT = "The history of science"


def run_demo(out: str | Path = "runs/demo") -> dict:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file at --out or above it, or no permission
        raise LatentLMError(f"cannot create the demo directory {out} ({e.strerror or e}); choose another --out") from None
    exp = dict(DEMO_EXPERIMENT, out_dir=str(out))
    try:
        data_root()
    except LatentLMError as e:  # the demo still runs; the report says why there is no zero-shot table
        print(f"note: skipping zero-shot tasks: {e}", flush=True)
        exp["eval"] = dict(exp["eval"], tasks=[])
    path = out / "experiment.yaml"
    write_text_atomic(path, yaml.safe_dump(exp, sort_keys=False))
    t0 = time.perf_counter()
    report = run_compare(path)
    samples = {}
    for name in exp["runs"]:
        method, _, manifest = load_method(out / "runs" / name)
        tok = checkpoint_tokenizer(out / "runs" / name, manifest)
        new = generate(method, [tok.encode(PROMPT)], max_new_tokens=40, temperature=0.8, top_k=40,
                       eot_id=tok.eot_id, seed=0)[0]
        samples[name] = PROMPT + tok.decode(new)
    print("\n" + report.read_text())
    print("samples (KV cache, temperature 0.8, top-k 40):")
    for name, text in samples.items():
        print(f"  [{name}] {text!r}")
    summary = {"report": str(report), "seconds": round(time.perf_counter() - t0, 1), "samples": samples}
    write_json_atomic(out / "summary.json", summary)
    print(f"done in {summary['seconds']:.0f}s; report in {report}")
    return summary
