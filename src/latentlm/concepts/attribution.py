"""Attribution-based concept labels (CoCoMix, docs/METHODS.md §2.1).

A concept's attribution score at a token is ``(g W_dec)_i * a_i``: the gradient ``g`` of the
teacher's NTP loss (the cross-entropy, as the authors' code backpropagates) w.r.t. its residual
stream, projected on the concept's decoder direction, times the concept's activation ``a_i``. It is
the first-order *decrease* of the teacher's loss when the concept is removed (removing it moves the
stream by ``-a_i W_dec[i]``, which changes the loss by ``-score``). So the selected concepts, those
with the largest positive scores, are the ones whose removal LOWERS the teacher's loss (a test checks
it on a trained teacher). (The SAE's per-token scale ``s`` would multiply every score of a token by
the same positive number, so it changes neither signs nor ranking and is left out, as in
docs/METHODS.md §2.1.)

Two gradients (``score``):

* ``official`` (the authors' code): ``g_t = d(sum_t' loss_t') / dh_t`` at the teacher's own hidden
  state ``h``, one backward of the summed all-position loss;
* ``eq1`` (the paper's Eq. (1)): per position, the gradient of that position's own next-token loss
  with respect to the concept vector ``c_t``, with the hooked layer replaced by the SAE
  reconstruction ``D(c)``: ``d loss_t / d c_{t,i} = s_t (g'_t . W_dec[i])``, ``g'_t = d loss_t / d D(c)_t``.
  One backward still does it (:class:`~latentlm.concepts.teacher._PerPositionGrad`).

The labels of a token are the ``k_attr`` concepts with the largest signed score. Activations
are the post-TopK latents by default (only the SAE's k active concepts can score), or the
pre-activations (``acts="pre"``, the paper's multiplier). Weights are in SAE-Lens layout: ``W_dec``
is [C, d], so the ``g W_dec`` of docs/METHODS.md §2.1 ([d, C] convention) is ``g @ W_dec.T`` here.
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


def _chunk_labels(sae: TopKSAE, x_hat: torch.Tensor, g: torch.Tensor | None, k_attr: int, acts: str,
                  select: str) -> torch.Tensor:
    """Labels [N, k_attr] for N normalised tokens ``x_hat`` (no last-position masking here)."""
    pre = sae.pre_activations(x_hat)
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


def _reconstruct(sae: TopKSAE, h: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D(c), s)``: the SAE reconstruction of ``h`` [..., d] in its own space (the k active decoder
    rows gathered, chunks of ``step`` tokens) and the per-token scale s [..., 1]."""
    flat = h.reshape(-1, h.shape[-1]).to(sae.W_dec)
    x_hat, mu, s = sae.normalize(flat)
    parts = []
    for i in range(0, len(flat), step):
        vals, ids = sae.topk(sae.pre_activations(x_hat[i:i + step]))
        parts.append(torch.einsum("nk,nkd->nd", vals, sae.W_dec[ids]))
    rec = (torch.cat(parts) + sae.b_dec) * s + mu
    return rec.view(h.shape), s.view(*h.shape[:-1], 1)


SCORES = ("official", "eq1")


@torch.no_grad()
def concept_labels(teacher: Teacher, sae: TopKSAE, idx: torch.Tensor, layer: int, *, k_attr: int = 4,
                   acts: Literal["post", "pre"] = "post",
                   select: Literal["attribution", "activation"] = "attribution",
                   score: Literal["official", "eq1"] = "official",
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    """Concept labels int64 [B, T, k_attr] of the windows ``idx`` [B, T]; ``-1`` means masked.

    ``select="attribution"`` ranks concepts by signed attribution score (``score``: the gradient of the
    authors' code or of the paper's Eq. (1), see the module docstring); ``"activation"`` (the ablation)
    by activation. A label is masked when its ranking score is not strictly positive (so missing
    positive concepts are never trained on as fillers). ``targets`` [B, T] are the windows' next tokens
    (the loader's ``y``, whose last one lies past ``idx``): with them every position has a next-token
    loss; without, the last position has none (a zero gradient) and is masked entirely.
    """
    if acts not in ("post", "pre"):
        raise LatentLMError(f"concept acts must be 'post' or 'pre', got {acts!r}")
    if select not in ("attribution", "activation"):
        raise LatentLMError(f"concept selection must be 'attribution' or 'activation', got {select!r}")
    if score not in SCORES:
        raise LatentLMError(f"concept score must be one of {', '.join(SCORES)}, got {score!r}")
    if k_attr < 1:
        raise LatentLMError(f"k_attr must be at least 1, got {k_attr}")
    step = max(1, CHUNK_ELEMENTS // sae.n_latents)
    scale = None
    if select == "activation":
        h, g = teacher.hidden(idx, layer), None
    elif score == "official":
        h, g = teacher.hidden_and_grad(idx, layer, targets=targets)
    else:
        scales: list[torch.Tensor] = []

        def replace(h: torch.Tensor) -> torch.Tensor:
            rec, s = _reconstruct(sae, h, step)
            scales.append(s)
            return rec

        h, g = teacher.hidden_and_grad(idx, layer, targets=targets, replace=replace, per_position=True)
        scale = scales[0]
    B, T, d = h.shape
    x_hat = sae.normalize(h.reshape(B * T, d).to(sae.W_dec))[0]
    if g is not None:
        g = g.reshape(B * T, d).to(sae.W_dec)
        if scale is not None:  # d loss / d c_i = s (g' . W_dec[i]): the decoder's output is scaled by s
            g = g * scale.reshape(B * T, 1).to(g)
    labels = torch.cat([_chunk_labels(sae, x_hat[i:i + step], None if g is None else g[i:i + step], k_attr, acts,
                                      select) for i in range(0, B * T, step)]).view(B, T, k_attr)
    if targets is None:
        labels[:, -1] = MASK
    return labels


def label_flops_per_token(teacher: ModelConfig, layer: int, seq_len: int, n_latents: int,
                          select: Literal["attribution", "activation"] = "attribution",
                          acts: Literal["post", "pre"] = "post") -> float:
    """Teacher + SAE FLOPs to label one token (flops.py's convention).

    Attribution runs the teacher's whole forward (its loss needs the logits) and a backward from
    the loss down to block ``layer`` only. The teacher is frozen, so that backward computes input
    gradients alone: 1 x the forward matmuls, and 2 x the attention products (scores and values
    both get gradients). The activation ablation stops after block ``layer``. The SAE encoder
    adds 2 d C, and so does the dense projection ``g W_dec`` of pre-activation scores
    (``acts="pre"``); the k-way gathers (post-TopK scores, the eq1 reconstruction) and TopK are
    ignored. Both scores (official, eq1) cost the same FLOPs: eq1 writes its attention out
    explicitly, which costs memory and time, not matmul FLOPs.
    """
    upper = teacher.n_layer - layer - 1
    sae = 2.0 * teacher.n_embd * n_latents
    if select == "activation":
        return forward_flops_per_slot(teacher, seq_len, n_layers=layer + 1, head=False) + sae
    backward = 2.0 * matmul_params(teacher, upper, head=True) + 8.0 * upper * teacher.n_embd * seq_len
    project = sae if acts == "pre" else 0.0
    return forward_flops_per_slot(teacher, seq_len) + backward + sae + project
