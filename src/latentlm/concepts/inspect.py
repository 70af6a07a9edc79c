"""Concept inspection for CoCoMix (docs/METHODS.md §2.7).

:func:`collect_top_contexts` streams a prepared corpus through the teacher and its SAE and keeps,
for every latent, the ``top_n`` tokens that activate it most, decoded into short text snippets
with the activating token marked ``[[like this]]``. :func:`save_contexts` stores them as
``contexts.json`` next to the SAE, where they serve as the concepts' descriptions.
:func:`inspect_text` lists the concepts a CoCoMix student predicts at each token of a text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from latentlm.concepts.labels import sae_fingerprint
from latentlm.concepts.sae import TopKSAE, check_sae_matches, load_sae
from latentlm.concepts.teacher import Teacher
from latentlm.data.loader import TokenSplit, iter_eval_windows
from latentlm.data.prepare import check_tokenizer, load_manifest
from latentlm.data.tokenizers import Tokenizer
from latentlm.errors import LatentLMError
from latentlm.fileio import ManifestFormat, retry_hint, sha256_file, write_errors

CONTEXTS_FILE = "contexts.json"
CONTEXTS_KIND = "latentlm-concept-contexts"
CONTEXTS_FORMAT_VERSION = 1
CONTEXTS_FORMAT = ManifestFormat(CONTEXTS_KIND, CONTEXTS_FORMAT_VERSION, "a concept-contexts file",
                                 "re-run `latentlm concepts contexts --sae {dir}`", name=CONTEXTS_FILE)
NO_DESCRIPTION = "(no description: run `latentlm concepts contexts`)"


def _one_line(text: str) -> str:
    """``text`` with line breaks and tabs escaped, so a snippet stays on one line."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _snippet(split: TokenSplit, tokenizer: Tokenizer, index: int, left: int, right: int) -> str:
    """Decoded tokens around stream position ``index``, the token itself marked ``[[...]]``."""
    lo, hi = max(0, index - left), min(len(split), index + right + 1)
    ids = split.get(lo, hi - lo).tolist()
    at = index - lo
    parts = (tokenizer.decode(ids[:at]), tokenizer.decode(ids[at:at + 1]), tokenizer.decode(ids[at + 1:]))
    return _one_line(f"{parts[0]}[[{parts[1]}]]{parts[2]}")


@torch.no_grad()
def collect_top_contexts(teacher: Teacher, sae: TopKSAE, layer: int, data_dir: str | Path, *, split: str = "val",
                         seq_len: int = 64, batch_size: int = 8, max_tokens: int | None = 100_000, top_n: int = 8,
                         left: int = 12, right: int = 4, progress: bool = True) -> dict[str, Any]:
    """The ``top_n`` strongest activations of every SAE latent over ``split`` of ``data_dir``.

    The split is cut into consecutive windows of ``seq_len`` tokens (as ``latentlm eval`` does),
    at most ``max_tokens`` tokens in all (None = the whole split); each window runs through the
    teacher to ``layer`` and the SAE encoder. Per latent a running top-``top_n`` (value, stream
    position) is merged batch by batch, so memory is O(C * top_n). Latents that never fire are
    left out. Each kept activation gets a snippet of ``left`` tokens before and ``right`` after.
    """
    if min(seq_len, batch_size, top_n) < 1 or min(left, right) < 0 or (max_tokens is not None and max_tokens < 1):
        raise LatentLMError(f"seq_len, batch_size, top_n and max_tokens must be >= 1 and left/right >= 0; got "
                            f"{seq_len}, {batch_size}, {top_n}, {max_tokens}, {left}/{right}")
    check_tokenizer(load_manifest(data_dir), teacher.tokenizer)
    check_sae_matches(sae, teacher.describe(), layer, teacher.tokenizer.fingerprint())
    tokens = TokenSplit(data_dir, split)
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    sae = sae.to(teacher.device)
    best_vals = torch.full((top_n, sae.n_latents), -torch.inf, device=teacher.device)
    best_pos = torch.zeros((top_n, sae.n_latents), dtype=torch.long, device=teacher.device)
    bar = tqdm(total=n_windows, disable=not progress, unit="window", desc="contexts", dynamic_ncols=True)
    done = 0
    for x, _ in iter_eval_windows(tokens, seq_len, batch_size, max_batches=-(-n_windows // batch_size)):
        x = x[:n_windows - done]
        h = teacher.hidden(x, layer)
        acts = sae.encode(sae.normalize(h.to(sae.W_enc.dtype))[0]).flatten(0, 1).float()  # [B*T, C]
        pos = (done * seq_len + torch.arange(acts.shape[0], device=acts.device))[:, None].expand_as(acts)
        vals = torch.cat([best_vals, acts])
        best_vals, order = vals.topk(top_n, dim=0)
        best_pos = torch.cat([best_pos, pos]).gather(0, order)
        done += len(x)
        bar.update(len(x))
    bar.close()
    concepts: dict[str, Any] = {}
    vals, pos = best_vals.t().cpu(), best_pos.t().cpu()  # [C, top_n], each row sorted descending
    for c in torch.nonzero(vals[:, 0] > 0).flatten().tolist():
        top = [{"activation": round(v, 6), "window": p // seq_len, "position": p % seq_len,
                "snippet": _snippet(tokens, teacher.tokenizer, p, left, right)}
               for v, p in zip(vals[c].tolist(), pos[c].tolist()) if v > 0]
        concepts[str(c)] = {"description": top[0]["snippet"], "top": top}
    meta = {"data": str(Path(data_dir).resolve()), "manifest_sha256": sha256_file(Path(data_dir) / "manifest.json"),
            "split": split, "tokens_scanned": done * seq_len, "seq_len": seq_len, "layer": layer,
            "teacher": teacher.describe(), "top_n": top_n, "context": {"left": left, "right": right},
            "sae": {"fingerprint": sae_fingerprint(sae), "n_latents": sae.n_latents, "k": sae.k}}
    return CONTEXTS_FORMAT.stamp({"meta": meta, "concepts": concepts})


def save_contexts(contexts: dict[str, Any], sae_dir: str | Path) -> Path:
    """Write ``contexts`` atomically as ``contexts.json`` in the SAE directory; return its path. A
    failed write (a full disk) is one line, and the previous contexts.json stays as it was."""
    path = Path(sae_dir) / CONTEXTS_FILE
    with write_errors(path, retry_hint(path, path.exists()), errnos=None):
        CONTEXTS_FORMAT.write(sae_dir, contexts)
    return path


def load_contexts(sae_dir: str | Path) -> dict[str, Any] | None:
    """The SAE directory's ``contexts.json``, or None if there is none. Raises if it is not valid
    or was collected with other SAE weights than the ones in ``sae_dir``."""
    path = Path(sae_dir) / CONTEXTS_FILE
    if not path.is_file():
        return None
    contexts = CONTEXTS_FORMAT.read(sae_dir)
    if contexts["meta"]["sae"]["fingerprint"] != sae_fingerprint(load_sae(sae_dir)):
        raise LatentLMError(f"{path} was collected with other SAE weights than {sae_dir}'s; "
                            f"{CONTEXTS_FORMAT.rebuild_hint(sae_dir)}")
    return contexts


@torch.no_grad()
def inspect_text(method, tokenizer: Tokenizer, text: str, top: int = 5,
                 contexts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per token of ``text``: the ``top`` concepts a CoCoMix student predicts (largest logits z).

    Each record is ``{"position", "token_id", "token", "concepts": [{"id", "z", "description"}]}``;
    a description is the concept's best snippet from ``contexts`` (None without contexts, and a
    note for a concept that never fired on the scanned corpus).
    """
    if not getattr(method, "has_concepts", False):
        raise LatentLMError(f"concept inspection needs a checkpoint of a method with concepts (e.g. cocomix); "
                            f"this one was trained with {getattr(method, 'name', type(method).__name__)!r}")
    ids = tokenizer.encode(text)
    limit = method.model.cfg.block_size
    if not ids or len(ids) > limit:
        raise LatentLMError(f"the text must be 1..{limit} tokens (the model's block size); it has {len(ids)}")
    if not 1 <= top <= method.n_concepts:
        raise LatentLMError(f"top must be in [1, {method.n_concepts}], got {top}")
    if contexts is not None and contexts["meta"]["sae"]["n_latents"] != method.n_concepts:
        raise LatentLMError(f"the contexts describe {contexts['meta']['sae']['n_latents']} concepts, the student "
                            f"predicts {method.n_concepts}; pass the SAE the student was trained with")
    device = next(method.parameters()).device
    idx = torch.tensor([ids], device=device)
    z = method.concept_logits(idx)
    vals, cids = z[0].float().topk(top, dim=-1)
    described = {} if contexts is None else contexts["concepts"]
    inactive = "(never active in the scanned corpus)"
    records = []
    for t, (tok, vs, cs) in enumerate(zip(ids, vals.tolist(), cids.tolist())):
        concepts = [{"id": c, "z": v, "description": None if contexts is None
                     else described.get(str(c), {}).get("description", inactive)} for v, c in zip(vs, cs)]
        records.append({"position": t, "token_id": tok, "token": tokenizer.decode([tok]), "concepts": concepts})
    return records
