"""Steerability of a concept student (CoCoMix's claim): steer topic concepts with a range of alpha
and measure the shift of probability mass toward each concept's tokens, against the unsteered
run and a random-concept control (latentlm.concepts.steer_eval). Prints a markdown table.

    latentlm concepts contexts --teacher T --sae S --data D --seq-len 64 --max-tokens 100000
    python benchmarks/steering.py runs/study/smollm2/runs/cocomix/seed-0 --out steering.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latentlm.concepts.inspect import load_contexts
from latentlm.concepts.steer_eval import format_steering, measure_steering
from latentlm.data.loader import TokenSplit
from latentlm.errors import LatentLMError
from latentlm.fileio import write_json_atomic
from latentlm.loading import checkpoint_tokenizer, load_method


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="run directory of a method with concepts (cocomix, ponder_concepts)")
    ap.add_argument("--sae", help="SAE directory holding contexts.json (default: the run's concepts.sae)")
    ap.add_argument("--alphas", default="-10,-5,1,2,5,10", help="comma-separated steering factors (1 = unsteered)")
    ap.add_argument("--n-concepts", type=int, default=8)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--stop", type=int, default=200, help="most frequent token ids left out of the targets")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the full result (per-prompt shifts included) as JSON here")
    a = ap.parse_args(argv)
    try:
        alphas = [float(x) for x in a.alphas.split(",") if x.strip()]
        method, cfg, manifest = load_method(a.checkpoint)
        sae = a.sae or cfg.concepts.sae
        contexts = load_contexts(sae) if sae else None
        if contexts is None:
            raise LatentLMError(f"no contexts.json in {sae!r}; run `latentlm concepts contexts --sae {sae}` first")
        meta = contexts["meta"]
        r = measure_steering(method, checkpoint_tokenizer(a.checkpoint, manifest), contexts,
                             val=TokenSplit(cfg.data.path, "val"), scanned=TokenSplit(meta["data"], meta["split"]),
                             alphas=alphas, n_concepts=a.n_concepts, n_prompts=a.n_prompts, prompt_len=a.prompt_len,
                             new_tokens=a.new_tokens, stop=a.stop, batch_size=a.batch_size, seed=a.seed)
    except (LatentLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        write_json_atomic(Path(a.out), {"checkpoint": str(a.checkpoint), **r})
    print(format_steering(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
