"""Attribution-based concept labels (CoCoMix, docs/METHODS.md §2.1).

A concept's attribution score at a token is ``(g W_dec)_i * a_i``: the gradient ``g`` of the
teacher's NTP loss w.r.t. its residual stream, projected on the concept's decoder direction,
times the concept's activation ``a_i``. It is the first-order change of the loss if the concept
were removed. (The SAE's per-token scale ``s`` would multiply every score of a token by the same
positive number, so it changes neither signs nor ranking and is left out, as in docs/METHODS.md §2.1.)

The labels of a token are the ``k_attr`` concepts with the largest signed score. Activations
are the post-TopK latents by default (only the SAE's k active concepts can score), or the
pre-activations. Weights are in SAE-Lens layout: ``W_dec`` is [C, d], so the ``g W_dec`` of docs/METHODS.md §2.1
([d, C] convention) is ``g @ W_dec.T`` here.
"""

from __future__ import annotations

from typing import Literal

import torch

from latentlm.concepts.sae import TopKSAE
from latentlm.concepts.teacher import Teacher
from latentlm.model.config import ModelConfig
from latentlm.errors import LatentLMError
from latentlm.model.flops import forward_flops_per_slot, matmul_params

MASK = -1
# Tokens per chunk are chosen so one chunk's dense [tokens, C] buffer holds at most this many elements.
CHUNK_ELEMENTS = 1 << 24


def attribution_scores(g: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Dense scores [..., C] = ``(g @ W_dec.T) * acts`` for g [..., d], acts [..., C], W_dec [C, d]."""
    return (g @ W_dec.t()) * acts


def active_attribution_scores(g: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor,
                              W_dec: torch.Tensor) -> torch.Tensor:
    """Scores [..., k] of only the active concepts ``ids`` [..., k] with activations ``vals``.

    Equal to gathering :func:`attribution_scores` at ``ids``, at k/C of its cost.
    """
    return torch.einsum("...d,...kd->...k", g, W_dec[ids]) * vals


def _chunk_labels(sae: TopKSAE, h: torch.Tensor, g: torch.Tensor | None, k_attr: int, acts: str,
                  select: str) -> torch.Tensor:
    """Labels [N, k_attr] for N tokens (no last-position masking here)."""
    pre = sae.pre_activations(sae.normalize(h)[0])
    if acts == "post":
        vals, ids = sae.topk(pre)
        score = active_attribution_scores(g, vals, ids, sae.W_dec) if select == "attribution" else vals
    else:
        ids = None
        score = attribution_scores(g, pre, sae.W_dec) if select == "attribution" else pre
    k = min(k_attr, score.shape[-1])
    top, pos = score.topk(k, dim=-1)
    labels = pos if ids is None else ids.gather(-1, pos)
    labels = labels.masked_fill(top <= 0, MASK)
    if k < k_attr:  # fewer candidates than labels asked for: the rest are masked fillers
        labels = torch.cat([labels, labels.new_full((*labels.shape[:-1], k_attr - k), MASK)], dim=-1)
    return labels


@torch.no_grad()
def concept_labels(teacher: Teacher, sae: TopKSAE, idx: torch.Tensor, layer: int, *, k_attr: int = 4,
                   acts: Literal["post", "pre"] = "post",
                   select: Literal["attribution", "activation"] = "attribution") -> torch.Tensor:
    """Concept labels int64 [B, T, k_attr] of the windows ``idx`` [B, T]; ``-1`` means masked.

    ``select="attribution"`` ranks concepts by signed attribution score; ``"activation"`` (the
    ablation) by activation. A label is masked when its ranking score is not strictly positive
    (so missing positive concepts are never trained on as fillers), and the last position is
    masked entirely (it has no next-token target, hence a zero gradient).
    """
    if acts not in ("post", "pre"):
        raise LatentLMError(f"concept acts must be 'post' or 'pre', got {acts!r}")
    if select not in ("attribution", "activation"):
        raise LatentLMError(f"concept selection must be 'attribution' or 'activation', got {select!r}")
    if k_attr < 1:
        raise LatentLMError(f"k_attr must be at least 1, got {k_attr}")
    h, g = teacher.hidden_and_grad(idx, layer) if select == "attribution" else (teacher.hidden(idx, layer), None)
    B, T, d = h.shape
    h, g = (None if t is None else t.reshape(B * T, d).to(sae.W_dec) for t in (h, g))
    step = max(1, CHUNK_ELEMENTS // sae.n_latents)
    labels = torch.cat([_chunk_labels(sae, h[i:i + step], None if g is None else g[i:i + step], k_attr, acts, select)
                        for i in range(0, B * T, step)]).view(B, T, k_attr)
    labels[:, -1] = MASK
    return labels


def label_flops_per_token(teacher: ModelConfig, layer: int, seq_len: int, n_latents: int,
                          select: Literal["attribution", "activation"] = "attribution") -> float:
    """Teacher + SAE FLOPs to label one token (flops.py's convention).

    Attribution runs the teacher's whole forward (its loss needs the logits) and a backward from
    the loss down to block ``layer`` only. The teacher is frozen, so that backward computes input
    gradients alone: 1 x the forward matmuls, and 2 x the attention products (scores and values
    both get gradients). The activation ablation stops after block ``layer``. The SAE encoder
    adds 2 d C; the k-way gather and TopK are ignored.
    """
    upper = teacher.n_layer - layer - 1
    sae = 2.0 * teacher.n_embd * n_latents
    if select == "activation":
        return forward_flops_per_slot(teacher, seq_len, n_layers=layer + 1, head=False) + sae
    backward = 2.0 * matmul_params(teacher, upper, head=True) + 8.0 * upper * teacher.n_embd * seq_len
    return forward_flops_per_slot(teacher, seq_len) + backward + sae
