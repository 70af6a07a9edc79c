"""CoCoMix's concept head as a reusable piece: predict concepts, keep the TopK, compress (docs/METHODS.md §2.2-2.3).

Reading a residual stream ``h`` [..., d] (normalised like the SAE's input, not detached):

    z     = W_pred (x_hat - b) + b_pred                    [..., C] concept logits
    z_k   = TopK_k(z)                                      raw values, no ReLU
    c_hat = (W_comp z_k + b_comp + b) * s + mu             [..., d]

``W_comp z_k`` is a gather of the k selected columns (``embedding_bag``), never a C-wide matmul.
The loss against a teacher's labels is the mean C-way cross-entropy over unmasked labels, in
chunks whose softmax is recomputed in backward. Steering multiplies chosen logits before the TopK.

:class:`HiddenHead` is the paper's Fig. 6b ablation in the same shape: it predicts the teacher's
(normalised) hidden state itself, ``p = W_pred (x_hat - b) + b_pred`` [..., d_teacher], trained with an
l1, l2 or cosine loss, and inserts ``(W_comp p + b_comp + b) * s + mu`` (a dense map, no TopK).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from latentlm.concepts.sae import TopKSAE
from latentlm.errors import LatentLMError
from latentlm.model import losses


def _masked_ce_sum(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over unmasked ``labels`` [n, k] of ``CE(z_row, label)`` for one chunk of logits ``z`` [n, C]."""
    z = z.float()
    keep = labels >= 0
    picked = z.gather(-1, labels.clamp(min=0))
    return ((torch.logsumexp(z, dim=-1, keepdim=True) - picked) * keep).sum()


class _ConceptCE(torch.autograd.Function):
    """``sum_rows sum_k keep_k (logsumexp(z_row) - z_row[label_k])`` over ``z`` [N, C] in chunks of
    ``rows``: forward keeps only the float32 log-partitions [N]; backward writes the gradient
    ``n_keep * softmax(z) - sum_k keep_k onehot(label_k)`` chunk by chunk into one [N, C] tensor
    (no per-chunk zero-padded slice gradients, no recomputed autograd graph)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        total = z.new_zeros((), dtype=torch.float32)
        lse = []
        for i in range(0, z.shape[0], rows):
            part, lab = z[i:i + rows].float(), labels[i:i + rows]
            m = torch.logsumexp(part, dim=-1)
            lse.append(m)
            total = total + ((m[:, None] - part.gather(-1, lab.clamp(min=0))) * (lab >= 0)).sum()
        ctx.rows = rows
        ctx.save_for_backward(z, labels, torch.cat(lse))
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, labels, lse = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(z)
        for i in range(0, z.shape[0], rows):
            lab = labels[i:i + rows]
            keep = (lab >= 0).float()
            p = (z[i:i + rows].float() - lse[i:i + rows, None]).exp_().mul_(keep.sum(-1, keepdim=True))
            p.scatter_add_(-1, lab.clamp(min=0), -keep)
            grad[i:i + rows] = p.mul_(g)
        return grad, None, None


def label_norm(labels: torch.Tensor, per: str = "label") -> torch.Tensor:
    """The denominator of :meth:`ConceptHead.loss` for this process's ``labels`` [..., k_attr]: the
    unmasked labels of the whole data-parallel batch (all-reduced over the default process group when
    one is running) divided by the world size, float32 [] on the labels' device. Each rank's loss is
    then its CE sum x world / global count, and the gradient mean DDP / FSDP take over ranks is that of
    the mean over every rank's labels, i.e. one process's objective on the same global batch (ranks
    mask different numbers of labels, so their own counts would weight their labels differently). In
    one process it is the batch's own count, exactly the default. Called outside the (compiled,
    wrapped) forward, e.g. in ``batch_inputs``; a device tensor, so no host sync.

    ``per="position"`` counts every label slot, masked or not (k_attr per position): the loss is then
    ``(1/k_attr) sum_i CE`` averaged over all positions with masked labels adding zero, the weighting of
    the authors' code (their mean over positions of each label's CE); per label, a position whose labels
    are half masked weighs its remaining labels twice as much."""
    if per not in ("label", "position"):
        raise LatentLMError(f"concept loss normalisation must be 'label' or 'position', got {per!r}")
    count = ((labels >= 0).sum() if per == "label" else torch.tensor(labels.numel(), device=labels.device))
    count = count.to(torch.float64)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return (count.clamp(min=1) / world).float()


class ConceptHead(nn.Module):
    """``n_concepts`` C concept logits of a width-``d`` stream, its TopK ``k_concepts`` and (with
    ``compress``) the continuous concept vector. Parameters are drawn with std ``init_std``."""

    def __init__(self, d: int, n_concepts: int, k_concepts: int, init_std: float, compress: bool = True):
        super().__init__()
        if not 0 < k_concepts <= n_concepts:
            raise LatentLMError(f"k_concepts={k_concepts} must be in [1, n_concepts={n_concepts}]")
        self.n_concepts, self.k_concepts = n_concepts, k_concepts
        self.predict = nn.Linear(d, n_concepts)  # W_pred, b_pred
        nn.init.normal_(self.predict.weight, 0.0, init_std)
        nn.init.zeros_(self.predict.bias)
        if compress:  # only when the vector is used: DDP would need find_unused_parameters otherwise
            # W_comp stored transposed (one row per concept): the k selected columns are a row gather.
            self.compress_weight = nn.Parameter(torch.empty(n_concepts, d))
            nn.init.normal_(self.compress_weight, 0.0, init_std)
            self.compress_bias = nn.Parameter(torch.zeros(d))  # b_comp
        self.b = nn.Parameter(torch.zeros(d))  # shared pre-encoder / post-decoder bias
        self.set_steering([], [])

    def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, mu, s)``: concept logits [..., C] of the stream ``h`` and its normalisation stats."""
        x_hat, mu, s = TopKSAE.normalize(h)
        return self.predict(x_hat - self.b.to(x_hat.dtype)), mu, s

    def compress(self, z: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``c_hat`` [..., d] from the k largest raw concept logits (gathered columns of W_comp)."""
        vals, idx = z.topk(self.k_concepts, dim=-1)
        w = self.compress_weight
        mixed = F.embedding_bag(idx.flatten(0, -2), w, per_sample_weights=vals.flatten(0, -2).to(w.dtype),
                                mode="sum").view(*z.shape[:-1], -1)
        return (mixed + self.compress_bias + self.b) * s + mu

    def loss(self, z: torch.Tensor, labels: torch.Tensor, chunk: int, norm: torch.Tensor | None = None,
             acc_norm: torch.Tensor | None = None, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean CE over unmasked labels [..., k_attr] (-1 = masked) and the fraction of them among the
        top-k_attr logits (chance ~ k_attr / C), in chunks of ``chunk`` rows (only the rows'
        log-partitions are kept; backward recomputes each chunk's softmax straight into the
        gradient). Both sums are divided by ``norm``, by default this batch's unmasked labels;
        data-parallel training passes :func:`label_norm`'s. ``acc_norm`` divides the hits instead
        when ``norm`` does not count labels (``label_norm(per="position")``). ``fused=False`` (a
        run's ``train.fused_loss``) checkpoints each chunk instead, the computation before the
        fused one."""
        flat, lab = z.flatten(0, -2), labels.flatten(0, -2)
        grad = torch.is_grad_enabled() and flat.requires_grad
        if grad and fused and losses.FUSED:
            total = _ConceptCE.apply(flat, lab, chunk)
        else:  # no gradient; or the plain way (losses.fused_head(False)): autograd recomputing each chunk
            total = flat.new_zeros((), dtype=torch.float32)
            for i in range(0, flat.shape[0], chunk):
                part = (flat[i:i + chunk], lab[i:i + chunk])
                total = total + (checkpoint(_masked_ce_sum, *part, use_reentrant=False) if grad
                                 else _masked_ce_sum(*part))
        keep = lab >= 0
        count = keep.sum().clamp(min=1) if norm is None else norm
        with torch.no_grad():
            top = flat.topk(min(lab.shape[-1], self.n_concepts), dim=-1).indices
            hits = ((top[:, None, :] == lab[:, :, None]).any(-1) & keep).sum()
        return total / count, hits / (count if acc_norm is None else acc_norm)

    def flops_per_token(self) -> float:
        """2 d C for W_pred, and 2 k d for the gathered W_comp when compressing (norms, TopK ignored)."""
        d = self.b.shape[0]
        return 2.0 * d * self.n_concepts + (2.0 * self.k_concepts * d if hasattr(self, "compress_weight") else 0.0)

    # --- steering (generation) ------------------------------------------------------------------

    def set_steering(self, concept_ids: list[int], alphas: list[float], on_prompt: bool = False) -> None:
        """Multiply concept logits ``z[i]`` by ``alpha`` before the TopK in :meth:`steer`: at every
        position whose output picks a new token (a prefill's last one and each generated one), or at
        every prompt position too with ``on_prompt``. ``set_steering([], [])`` clears."""
        if len(concept_ids) != len(alphas):
            raise LatentLMError(f"steering needs one alpha per concept; got {len(concept_ids)} concepts "
                                f"and {len(alphas)} alphas")
        bad = [i for i in concept_ids if not 0 <= i < self.n_concepts]
        if bad:
            raise LatentLMError(f"steering concepts {bad} are not in [0, {self.n_concepts})")
        self.steer_ids, self.steer_alphas, self.steer_on_prompt = list(concept_ids), list(alphas), on_prompt

    def steer(self, z: torch.Tensor, prefill: bool) -> torch.Tensor:
        """``z`` [B, T, C] with the steering applied (``prefill``: ``z`` holds a whole prompt)."""
        if not self.steer_ids:
            return z
        scale = torch.ones(z.shape[-2:], device=z.device, dtype=z.dtype)  # [T, C]
        rows = slice(-1, None) if prefill and not self.steer_on_prompt else slice(None)
        scale[rows, self.steer_ids] = torch.tensor(self.steer_alphas, device=z.device, dtype=z.dtype)
        return z * scale


HIDDEN_LOSSES = ("l1", "l2", "cosine")


class HiddenHead(nn.Module):
    """The Fig. 6b ablation's head: predict the teacher's normalised hidden state [..., d_target] from a
    width-``d`` stream and (with ``compress``) insert a dense map of the prediction back. The same calls
    as :class:`ConceptHead` (``logits``, ``compress``, ``steer``), so the student runs unchanged."""

    def __init__(self, d: int, d_target: int, init_std: float, compress: bool = True):
        super().__init__()
        self.n_concepts = d_target
        self.predict = nn.Linear(d, d_target)
        nn.init.normal_(self.predict.weight, 0.0, init_std)
        nn.init.zeros_(self.predict.bias)
        if compress:
            self.compress_layer = nn.Linear(d_target, d)
            nn.init.normal_(self.compress_layer.weight, 0.0, init_std)
            nn.init.zeros_(self.compress_layer.bias)
        self.b = nn.Parameter(torch.zeros(d))

    def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p, mu, s)``: the predicted teacher hidden state and ``h``'s normalisation stats."""
        x_hat, mu, s = TopKSAE.normalize(h)
        return self.predict(x_hat - self.b.to(x_hat.dtype)), mu, s

    def compress(self, p: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (self.compress_layer(p) + self.b) * s + mu

    @staticmethod
    def loss(p: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
        """Mean over positions of the ``kind`` distance (l1 and l2 also over features) between the
        prediction and ``target``, in float32."""
        p, target = p.float(), target.float()
        if kind == "l1":
            return (p - target).abs().mean()
        if kind == "l2":
            return (p - target).pow(2).mean()
        if kind == "cosine":
            return (1.0 - F.cosine_similarity(p, target, dim=-1)).mean()
        raise LatentLMError(f"hidden-state loss must be one of {', '.join(HIDDEN_LOSSES)}, got {kind!r}")

    def flops_per_token(self) -> float:
        """2 d d_target to predict, as much again to insert (when compressing); norms ignored."""
        d = self.b.shape[0]
        return 2.0 * d * self.n_concepts * (2 if hasattr(self, "compress_layer") else 1)

    def set_steering(self, concept_ids: list[int], alphas: list[float], on_prompt: bool = False) -> None:
        if concept_ids:
            raise LatentLMError("this student predicts the teacher's hidden state (cocomix.concept_target), not "
                                "concepts: there is no concept to steer")

    def steer(self, z: torch.Tensor, prefill: bool) -> torch.Tensor:
        return z
