"""Training losses over the LM head, computed in row chunks so full-vocabulary logits never exist at once.

``lm_head(norm_f(h))`` gives ``[N, V]`` logits; the plain way to train on them keeps those logits,
their float32 log-softmax and, in backward, several more ``[N, V]`` tensors (the log-softmax's
gradient, the zero-filled gradient of every slice). Here the head, the cross-entropy (and KD's KL
term) and their gradients are computed together, a block of rows at a time: for each block the
logits are formed, turned into log-probabilities, the loss summed and the gradient with respect
to the logits (``softmax - onehot``, plus KD's term) formed in place and pushed through the two
head matmuls at once. Only the gradients of the head's input ``[N, d]`` and weight ``[V, d]`` are
kept for backward, which scales them by the incoming gradient. Same values as the plain
computation (float rounding aside; tested for every method that trains on the head), at about
half its elementwise passes over ``[N, V]`` and a fraction of its memory.

The matmuls keep the head's padded width (``padded_vocab_size``, a multiple of 64: the fast GPU
kernels); the padded columns are set to -inf before the softmax, so they never score and their
gradient is zero, exactly as if the logits had been sliced to ``vocab_size`` (no slice is copied).

``fused=False`` (a run's ``train.fused_loss: false``, which configs saved before the key existed get)
computes the plain way; :data:`FUSED` switches every caller to it (``with fused_head(False)``), for
A/B tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from latentlm.errors import LatentLMError

# Logits per row chunk (rows = this // vocab): 2^27 float32 logits are 512 MiB, e.g. 2,600 rows of
# GPT-2's vocabulary: a GPU step of 16 x 1024 in seven chunks.
CHUNK_ELEMENTS = 2 ** 27
# On the CPU, 2^22 (16 MiB of float32: 83 rows of GPT-2's vocabulary): a block that large is a fresh
# allocation the kernel must zero-fill page by page on first touch, every step; blocks under glibc's
# mmap threshold (32 MiB at most) are reused from the heap. Measured on 2 cores (tiny preset, 16 x 128
# tokens, vocab 50,257): NTP's step 20% and KD's 48% faster than with one 2^27 block; 2^20, 2^21, 2^23
# and 2^24 were slower (docs/BENCHMARKS.md, "KD and CoCoMix per FLOP").
CPU_CHUNK_ELEMENTS = 2 ** 22
FUSED = True  # False: head losses (and the concept cross-entropy) are computed the plain way, full logits


@contextlib.contextmanager
def fused_head(enabled: bool) -> Iterator[None]:
    """Within the block, head losses are fused (True) or computed the plain way (False)."""
    global FUSED
    before, FUSED = FUSED, enabled
    try:
        yield
    finally:
        FUSED = before


def chunk_rows(n_rows: int, vocab: int, chunk: int | None = None, device_type: str = "cuda") -> int:
    """Rows per chunk: ``chunk`` if given, else as many as fit :data:`CHUNK_ELEMENTS` logits
    (:data:`CPU_CHUNK_ELEMENTS` on the CPU)."""
    limit = CPU_CHUNK_ELEMENTS if device_type == "cpu" else CHUNK_ELEMENTS
    rows = chunk if chunk is not None else max(1, limit // max(vocab, 1))
    return max(1, min(rows, n_rows))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head(x)`` would compute in: autocast's where it is on, else x's."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _HeadLoss(torch.autograd.Function):
    """``(scale * (CE_sum + w tau^2 KL_sum), scale * CE_sum, scale * tau^2 KL_sum)`` of the logits
    ``x @ weight.T`` (``x`` [N, d]; the head's columns past ``vocab`` masked out) against targets ``y``
    [N] and, with ``teacher`` [N, vocab], the KD term ``KL(softmax(teacher / tau) || softmax(logits /
    tau))``. Gradients (of the first output only) are formed in forward, chunk by chunk, and scaled
    in backward."""

    @staticmethod
    def forward(ctx, x, weight, y, teacher, vocab: int, rows: int, scale: float, kd_weight: float,
                tau: float, dtype: torch.dtype, need_x: bool, need_w: bool):
        n = x.shape[0]
        padded = weight.shape[0] > vocab
        xc, wc = x.to(dtype), weight.to(dtype)  # the whole (padded) head: GEMM sizes stay multiples of 64
        grad = need_x or need_w
        ce = x.new_zeros((), dtype=torch.float32)
        kl = x.new_zeros((), dtype=torch.float32)
        grad_x = []
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        minus_one = None
        for start in range(0, n, rows):
            xr, yr = xc[start:start + rows], y[start:start + rows, None]
            logits = torch.mm(xr, wc.t()).float()
            if padded:  # padded rows never score: exp(-inf) = 0 in the softmax and in its gradient
                logits[:, vocab:] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1)
            ce = ce - logp.gather(1, yr).sum()
            if teacher is not None:
                t = teacher[start:start + rows].float()
                lt = torch.log_softmax(t if tau == 1.0 else t / tau, dim=-1)
                pt = lt.exp()
                logp_tau = logp[:, :vocab] if tau == 1.0 else torch.log_softmax(logits[:, :vocab] / tau, dim=-1)
                # sum p_t (log p_t - log p_s): a flat dot product, and a product with the strided student block
                # (one block-sized temporary, reused from the heap; a batched bmm of row vectors was 3x slower)
                kl = kl + torch.dot(pt.flatten(), lt.flatten()) - (pt * logp_tau).sum()
                del lt
            del logits
            if not grad:
                continue
            # d/dlogits of CE + w tau^2 KL: softmax - onehot + w tau (softmax_tau - p_t), built in place
            g = logp.exp_()
            if teacher is not None:
                if tau == 1.0:
                    g[:, :vocab].mul_(1.0 + kd_weight).sub_(pt, alpha=kd_weight)
                else:
                    g[:, :vocab].add_(logp_tau.exp_().sub_(pt), alpha=kd_weight * tau)
            if minus_one is None or minus_one.shape[0] != yr.shape[0]:
                minus_one = g.new_full((yr.shape[0], 1), -1.0)
            g.scatter_add_(1, yr, minus_one)
            g = g.to(dtype)
            if need_x:
                grad_x.append(torch.mm(g, wc))
            if need_w:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), xr)
                else:
                    grad_w += torch.mm(g.t(), xr).float()
        kd = kl * (tau * tau)
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.need = (need_x, need_w)
        saved = []
        if need_x:
            saved.append(torch.cat(grad_x).mul_(scale) if grad_x else x.new_zeros(x.shape, dtype=dtype))
        if need_w:
            saved.append(grad_w.mul_(scale))
        ctx.save_for_backward(*saved)
        ce, kd = ce * scale, kd * scale
        ctx.mark_non_differentiable(ce, kd)  # metrics for logging: no gradient flows through them
        return ce + kd_weight * kd, ce, kd

    @staticmethod
    def backward(ctx, g_total, g_ce, g_kd):
        saved = list(ctx.saved_tensors)
        need_x, need_w = ctx.need
        x_dtype, w_dtype = ctx.dtypes
        gx = saved.pop(0).to(x_dtype) * g_total if need_x else None
        gw = saved.pop(0).to(w_dtype) * g_total if need_w else None
        return gx, gw, None, None, None, None, None, None, None, None, None, None


def _plain(x, weight, y, teacher, vocab, kd_weight, tau):
    """The reference KD computation: full logits sliced to the vocabulary, ``F.cross_entropy`` and the
    KL of two log-softmaxes."""
    logits = F.linear(x, weight)[:, :vocab].float()
    ce = F.cross_entropy(logits, y)
    log_s = F.log_softmax(logits / tau, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / tau, dim=-1)
    kd = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean() * tau ** 2
    return ce + kd_weight * kd, ce.detach(), kd.detach()


def _plain_cross_entropy(model, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The computation training used before this module, op for op (``token_nll(model.head(h), y).mean()``),
    so a run with ``train.fused_loss: false`` gives the old results bit for bit."""
    logits = model.head(h)
    return F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="none").view_as(y).mean()


def _head_loss(model, h: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None, kd_weight: float,
               tau: float, chunk: int | None):
    vocab = model.cfg.vocab_size
    x = model.norm_f(h).reshape(-1, h.shape[-1])
    y = y.reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise LatentLMError(f"{x.shape[0]} hidden states but {y.shape[0]} targets; they must match one to one")
    if teacher is not None:
        if teacher.shape[-1] != vocab or teacher.numel() != y.numel() * vocab:
            raise LatentLMError(f"student logits {tuple(h.shape[:-1]) + (vocab,)} and teacher logits "
                                f"{tuple(teacher.shape)} differ; KD needs one shared vocabulary")
        teacher = teacher.detach().reshape(-1, vocab)
    weight = model.lm_head.weight
    if teacher is not None and not FUSED:
        return _plain(x, weight, y, teacher, vocab, kd_weight, tau)
    grad = torch.is_grad_enabled()
    rows = chunk_rows(x.shape[0], vocab, chunk, x.device.type)
    total, ce, kd = _HeadLoss.apply(x, weight, y, teacher, vocab, rows, 1.0 / x.shape[0], float(kd_weight),
                                    float(tau), _compute_dtype(x), grad and x.requires_grad,
                                    grad and weight.requires_grad)
    return total, ce.detach(), kd.detach()


def head_cross_entropy(model, h: torch.Tensor, y: torch.Tensor, *, chunk: int | None = None,
                       fused: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model.head(h)`` (``h`` [..., d] before the final norm)
    against ``y`` [...], equal to ``token_nll(model.head(h), y).mean()`` without materialising the
    logits (``chunk``: rows per block, default from :data:`CHUNK_ELEMENTS`). ``fused=False`` (a run's
    ``train.fused_loss``) computes it the plain way, through the logits."""
    if not (fused and FUSED):
        return _plain_cross_entropy(model, h, y)
    return _head_loss(model, h, y, None, 0.0, 1.0, chunk)[0]


def head_distill(model, h: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor, weight: float,
                 temperature: float = 1.0, *, chunk: int | None = None, fused: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(CE + weight * tau^2 KL(p_t || p_s), CE, tau^2 KL)`` of ``model.head(h)`` against ``y`` and the
    teacher's logits [..., V] (both distributions at temperature ``tau``; means over tokens; the last
    two detached, for logging): KD's loss, one pass over each block of student and teacher logits."""
    if not fused:
        with fused_head(False):
            return _head_loss(model, h, y, teacher_logits, weight, temperature, chunk)
    return _head_loss(model, h, y, teacher_logits, weight, temperature, chunk)
