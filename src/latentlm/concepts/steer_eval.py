"""Does steering a concept move the text toward that concept? (CoCoMix's interpretability claim.)

For a student that predicts concepts (a method with ``has_concepts``) and the top
contexts of its SAE's latents (``latentlm concepts contexts``):

1. Topic concepts: for every latent with at least ``min_contexts`` top contexts, its target tokens
   T_c are the distinct token ids in the windows of its top contexts (``left`` tokens before the
   activating token to ``right`` after), minus the ``stop`` most frequent ids of the scanned split
   (function words, punctuation). Its purity is the largest fraction of its contexts that share
   one target token; the ``n_concepts`` purest latents are taken (the rest of a concept's
   contexts then share its topic word; :func:`select_concepts`, printed with their snippets so a
   reader can judge the topic).
2. For every prompt (``n_prompts`` windows of ``prompt_len`` tokens from the val split) and every
   alpha: generate ``new_tokens`` tokens, steering (multiplying the concept's predicted logit by
   alpha before the TopK, as ``latentlm generate --steer``) and record at each step the
   probability mass the next-token distribution puts on T_c. Sampling uses the same seeded
   generator in every condition, so conditions differ by the steering alone.
3. The shift is the mean mass minus the unsteered run's mean mass, per prompt. The control steers
   a random other concept (drawn with ``seed``) by the same alpha and measures the mass on the
   same T_c: an effect of large alphas as such moves both, an effect of the concept only the first.

alpha = 1 multiplies by one, i.e. is the unsteered run, so its shift is exactly zero (a check of
the measurement, tested); the report gives mean +- standard error over prompts.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import numpy as np
import torch

from latentlm.data.loader import TokenSplit
from latentlm.data.tokenizers import Tokenizer
from latentlm.errors import LatentLMError
from latentlm.generate import generate, sample_next
from latentlm.methods.base import Method
from latentlm.methods.registry import methods


def token_frequencies(split: TokenSplit, n_tokens: int, vocab: int) -> np.ndarray:
    """Counts of each token id among the first ``n_tokens`` tokens of ``split``."""
    ids = np.asarray(split.get(0, min(len(split), n_tokens)), dtype=np.int64)
    return np.bincount(ids, minlength=vocab)


def concept_targets(contexts: dict[str, Any], split: TokenSplit, stop: set[int], left: int = 12,
                    right: int = 4) -> dict[int, list[set[int]]]:
    """Per concept: for each of its top contexts, the set of non-stop token ids in the window
    ``[p - left, p + right]`` around its activating position p of ``split`` (the split it was scanned on)."""
    seq_len = contexts["meta"]["seq_len"]
    out: dict[int, list[set[int]]] = {}
    for cid, entry in contexts["concepts"].items():
        sets = []
        for top in entry["top"]:
            p = top["window"] * seq_len + top["position"]
            lo = max(0, p - left)
            ids = np.asarray(split.get(lo, min(len(split), p + right + 1) - lo)).tolist()
            sets.append({int(i) for i in ids} - stop)
        out[int(cid)] = sets
    return out


def select_concepts(targets: dict[int, list[set[int]]], n_concepts: int, min_contexts: int = 4
                    ) -> list[dict[str, Any]]:
    """The ``n_concepts`` concepts with the purest targets (see the module docstring): ``{"concept",
    "purity", "word" (the shared token id), "targets" (sorted ids of T_c)}``, purest first (ties: more
    targets, then lower id)."""
    scored = []
    for cid, sets in targets.items():
        if len(sets) < min_contexts:
            continue
        union = set().union(*sets)
        if not union:
            continue
        counts = {t: sum(t in s for s in sets) for t in union}
        word = max(sorted(counts), key=lambda t: counts[t])
        scored.append({"concept": cid, "purity": counts[word] / len(sets), "word": word, "targets": sorted(union)})
    scored.sort(key=lambda d: (-d["purity"], -len(d["targets"]), d["concept"]))
    return scored[:n_concepts]


@torch.inference_mode()
def steered_mass(method: Method, prompts: torch.Tensor, targets: list[int], steer: tuple[int, float] | None, *,
                 new_tokens: int, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Mean probability mass on ``targets`` of the next-token distribution at each of ``new_tokens``
    sampled steps after each prompt (``prompts`` [B, L], equal lengths), with the concept ``steer =
    (concept, alpha)`` steered (None: unsteered); [B]. The sampling generator is seeded with ``seed``."""
    if steer is None:
        method.set_steering([], [])
    else:
        method.set_steering([steer[0]], [steer[1]])
    was_training = method.training
    method.eval()
    try:
        b, n = prompts.shape
        device = prompts.device
        cache = method.new_cache(b, n + new_tokens - 1)
        gen = torch.Generator(device=device).manual_seed(seed)
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)
        positions = torch.arange(n, device=device)[None].expand(b, n)
        logits = method.step(prompts, positions, torch.ones(b, n, dtype=torch.bool, device=device), cache)[:, -1]
        idx = torch.tensor(targets, device=device)
        mass = torch.zeros(b, dtype=torch.float64, device=device)
        for i in range(new_tokens):
            mass += logits.float().softmax(-1)[:, idx].sum(-1).double()
            if i + 1 < new_tokens:  # feed the sampled token: the next step's distribution
                token = sample_next(logits, temperature=temperature, top_k=None, top_p=None, generator=gen)
                logits = method.step(token[:, None], torch.full((b, 1), n + i, device=device), ones, cache)[:, -1]
        return (mass / new_tokens).cpu()
    finally:
        method.set_steering([], [])
        method.train(was_training)


def _mean_se(x: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(x), "se": statistics.stdev(x) / math.sqrt(len(x)) if len(x) > 1 else float("nan")}


def measure_steering(method: Method, tokenizer: Tokenizer, contexts: dict[str, Any], *, val: TokenSplit,
                     scanned: TokenSplit, alphas: list[float], n_concepts: int = 8, n_prompts: int = 64,
                     prompt_len: int = 32, new_tokens: int = 16, stop: int = 200, batch_size: int = 32, seed: int = 0,
                     samples: int = 3, sample_alpha: float | None = None) -> dict[str, Any]:
    """The whole measurement (module docstring); returns a JSON-able dict with the chosen concepts
    (snippets, target tokens), per alpha the steered and control shifts (mean +- s.e. over prompts,
    and the per-prompt values), and a few generations without and with steering."""
    if not getattr(method, "has_concepts", False):
        with_concepts = ", ".join(n for n, c in methods().items() if c.has_concepts)
        raise LatentLMError(f"steering needs a method with concepts ({with_concepts}), not "
                            f"{getattr(method, 'name', type(method).__name__)!r}")
    if contexts["meta"]["sae"]["n_latents"] != method.n_concepts:
        raise LatentLMError(f"the contexts describe {contexts['meta']['sae']['n_latents']} concepts, the student "
                            f"predicts {method.n_concepts}; pass the SAE the student was trained with")
    if min(n_concepts, n_prompts, prompt_len, new_tokens, batch_size) < 1 or not alphas:
        raise LatentLMError("n_concepts, n_prompts, prompt_len, new_tokens and batch_size must be >= 1, with "
                            "at least one alpha")
    vocab = method.model.cfg.vocab_size
    freq = token_frequencies(scanned, contexts["meta"]["tokens_scanned"], vocab)
    stop_ids = {int(i) for i in np.argsort(-freq, kind="stable")[:stop]}
    chosen = select_concepts(concept_targets(contexts, scanned, stop_ids), n_concepts)
    if not chosen:
        raise LatentLMError("no concept has enough top contexts to measure; scan more tokens with "
                            "`latentlm concepts contexts --max-tokens`")
    active = sorted(int(c) for c in contexts["concepts"])
    rng = random.Random(seed)
    window = prompt_len + 1
    n_avail = (len(val) - 1) // window
    if n_avail < 1:
        raise LatentLMError(f"the val split has {len(val)} tokens, fewer than one prompt of {prompt_len}")
    starts = [i * window for i in range(min(n_prompts, n_avail))]
    device = next(method.parameters()).device
    prompts = torch.as_tensor(np.stack([np.asarray(val.get(s, prompt_len), dtype=np.int64) for s in starts]),
                              device=device)

    def mass(targets: list[int], steer) -> list[float]:
        out = []
        for i in range(0, len(prompts), batch_size):
            out += steered_mass(method, prompts[i:i + batch_size], targets, steer, new_tokens=new_tokens,
                                seed=seed + i).tolist()
        return out

    results = []
    for c in chosen:
        control = rng.choice([a for a in active if a != c["concept"]] or [c["concept"]])
        base = mass(c["targets"], None)
        per_alpha = []
        for alpha in alphas:
            steered = [m - b for m, b in zip(mass(c["targets"], (c["concept"], alpha)), base)]
            ctrl = [m - b for m, b in zip(mass(c["targets"], (control, alpha)), base)]
            per_alpha.append({"alpha": alpha, "shift": _mean_se(steered), "control_shift": _mean_se(ctrl),
                              "shifts": steered, "control_shifts": ctrl})
        snippets = [t["snippet"] for t in contexts["concepts"][str(c["concept"])]["top"]]
        results.append({**c, "word_text": tokenizer.decode([c["word"]]), "control": control,
                        "base_mass": _mean_se(base), "alphas": per_alpha, "snippets": snippets})
    gens = _generations(method, tokenizer, prompts, results[:samples],
                        sample_alpha if sample_alpha is not None else max(alphas, key=abs), seed)
    return {"n_prompts": len(prompts), "prompt_len": prompt_len, "new_tokens": new_tokens, "stop_tokens": stop,
            "alphas": list(alphas), "seed": seed, "concepts": results, "generations": gens}


def _generations(method: Method, tokenizer: Tokenizer, prompts: torch.Tensor, concepts: list[dict], alpha: float,
                 seed: int) -> list[dict[str, Any]]:
    """For each concept: one prompt continued without and with steering (temperature 0.8, top-k 40)."""
    out = []
    prompt = prompts[0].tolist()
    for c in concepts:
        row = {"concept": c["concept"], "alpha": alpha, "prompt": tokenizer.decode(prompt)}
        for key, steer in (("unsteered", None), ("steered", c["concept"])):
            method.set_steering([] if steer is None else [steer], [] if steer is None else [alpha])
            try:
                new = generate(method, [prompt], max_new_tokens=32, temperature=0.8, top_k=40, seed=seed)[0]
            finally:
                method.set_steering([], [])
            row[key] = tokenizer.decode(new)
        out.append(row)
    return out


def format_steering(r: dict[str, Any]) -> str:
    """A markdown report of :func:`measure_steering`'s result."""
    lines = [f"Prompts: {r['n_prompts']} val windows of {r['prompt_len']} tokens, {r['new_tokens']} sampled tokens "
             f"each (temperature 1, the same seeded sampler in every condition). Mass = mean probability on the "
             f"concept's target tokens (its top contexts' tokens minus the {r['stop_tokens']} most frequent). "
             "Shift = steered minus unsteered, mean ± s.e. over prompts; control = a random other concept "
             "steered by the same alpha, mass on the same targets.", "",
             "| concept | shared word | purity | targets | unsteered mass | alpha | shift | control shift |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in r["concepts"]:
        for a in c["alphas"]:
            lines.append(f"| {c['concept']} | {c['word_text']!r} | {c['purity']:.2f} | {len(c['targets'])} | "
                         f"{c['base_mass']['mean']:.4f} | {a['alpha']:g} | {a['shift']['mean']:+.4f} ± "
                         f"{a['shift']['se']:.4f} | {a['control_shift']['mean']:+.4f} ± {a['control_shift']['se']:.4f} |")
    lines += ["", "Top contexts of the concepts:", ""]
    for c in r["concepts"]:
        lines.append(f"- {c['concept']}: " + " / ".join(f"`{s}`" for s in c["snippets"][:4]))
    if r["generations"]:
        lines += ["", "Generations (temperature 0.8, top-k 40):", ""]
        for g in r["generations"]:
            lines.append(f"- concept {g['concept']}, alpha {g['alpha']:g}, prompt `{g['prompt']}`: unsteered "
                         f"`{g['unsteered']}`; steered `{g['steered']}`")
    return "\n".join(lines)
