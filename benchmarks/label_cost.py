"""What CoCoMix's concept labels cost per token, and what the label cache saves, in one run.

Times, per training token: (1) computing attribution labels with the teacher (forward, backward
down to the SAE layer) and the SAE; (2) a CoCoMix student training step given labels (what a
run with a label cache pays); (3) the same step computing its labels on the fly (1 + 2); and
an NTP step of the student's shape for reference. Prints one markdown table.

    python benchmarks/label_cost.py --teacher runs/demo/runs/ntp          # after `make demo`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentlm.concepts.attribution import concept_labels
from latentlm.concepts.sae import TopKSAE
from latentlm.concepts.teacher import load_teacher
from latentlm.config import make_config
from latentlm.methods import build_method


def timed(fn, steps: int) -> float:
    times = []
    for i in range(steps + 1):  # the first call warms up
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher spec (a latentlm run dir, HF dir, .gguf, smollm2)")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    teacher = load_teacher(a.teacher)
    sae = TopKSAE(teacher.d_model, a.latents, a.k)  # label cost does not depend on the SAE's training
    vocab = teacher.tokenizer.vocab_size
    x = torch.randint(0, vocab, (a.batch, a.seq_len + 1))
    x, y = x[:, :-1], x[:, 1:]
    model = {"arch": "gpt2", "vocab_size": vocab, "block_size": a.seq_len, "n_layer": teacher.n_layer,
             "n_embd": teacher.d_model, "n_head": 4}
    cocomix = {"n_concepts": a.latents, "k_concepts": a.k, "insert_layer": min(2, teacher.n_layer - 1)}

    def labels():
        return concept_labels(teacher, sae, x, a.layer)

    def step(method, **extra):
        loss, _ = method(x, y, **extra)
        loss.backward()
        method.zero_grad(set_to_none=True)

    lab = labels()
    student = build_method(make_config(base={"model": model, "train": {"method": "cocomix"}, "cocomix": cocomix}))
    ntp = build_method(make_config(base={"model": model}))
    t_label = timed(labels, a.steps)
    t_cached = timed(lambda: step(student, labels=lab), a.steps)
    t_fly = timed(lambda: step(student, labels=labels()), a.steps)
    t_ntp = timed(lambda: step(ntp), a.steps)
    n = x.numel()
    print(f"teacher {a.teacher} ({teacher.n_layer} x {teacher.d_model}), SAE {a.latents} latents k={a.k} at layer "
          f"{a.layer}, {a.batch} x {a.seq_len} tokens, CPU {torch.get_num_threads()} threads, median of {a.steps}\n")
    print("| work per batch | ms | us/token | vs NTP step |")
    print("|---|---|---|---|")
    for name, t in [("NTP step (student shape)", t_ntp), ("labels: teacher fwd+bwd to layer + SAE", t_label),
                    ("CoCoMix step, labels from cache", t_cached), ("CoCoMix step, labels on the fly", t_fly)]:
        print(f"| {name} | {t * 1e3:.0f} | {t / n * 1e6:.1f} | {t / t_ntp:.2f} |")


if __name__ == "__main__":
    main()
