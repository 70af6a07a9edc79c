"""CoCoMix student (arXiv 2502.08524; SPEC sections 2.2-2.3, 2.6-2.7) and its pause baseline.

At the input of block ``L = cocomix.insert_layer`` the residual stream ``h`` [B, T, d] is
normalised like the SAE's input (``x_hat, mu, s``, not detached) and read by a concept head:

    z     = W_pred (x_hat - b) + b_pred                    [B, T, C] concept logits
    z_k   = TopK_k(z)                                      raw values, no ReLU
    c_hat = (W_comp z_k + b_comp + b) * s + mu             [B, T, d]

``W_comp z_k`` is a gather of the k selected columns (``embedding_bag``), never a C-wide matmul.
With ``mix="interleave"`` the blocks from L on run on ``h_1, c_1, h_2, c_2, ...`` (2T slots,
plain causal attention, ``c_t`` sharing ``h_t``'s position id; learned positions are added at
the input only, so concept slots get none) and the concept slots' outputs predict the next
token. ``mix="add"`` continues on ``h + c_hat`` (T slots); ``mix="none"`` inserts nothing.

Loss: NTP + ``concept_weight`` x the concept cross-entropy, the mean over unmasked labels
(label != -1) of ``CE(z_t, label_{t,i})``, which is ``(1/k_attr) sum_i CE`` averaged over
tokens when nothing is masked. ``concept_acc`` is the fraction of unmasked labels among the
student's top-``k_attr`` concept logits (chance ~ k_attr / C).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from latentlm.concepts.sae import TopKSAE
from latentlm.config import Config
from latentlm.errors import LatentLMError
from latentlm.methods.base import Method, token_nll, token_positions
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache, Transformer


def _check_insert_layer(model: Transformer, layer: int) -> int:
    if not 0 <= layer < model.cfg.n_layer:
        raise LatentLMError(f"cocomix.insert_layer={layer} must name a block of the student "
                            f"(0..{model.cfg.n_layer - 1})")
    return layer


def _lower(model: Transformer, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None,
           cache: KVCache | None, end: int) -> torch.Tensor:
    """Embed tokens (positions at the input) and run ``blocks[:end]``: the stream entering block ``end``."""
    x = model.add_positions(model.embed(idx), position_ids)
    return model.run_blocks(x, position_ids, 0, end, cache=cache, valid=valid)


def _interleaved_logits(model: Transformer, h: torch.Tensor, inserted: torch.Tensor, position_ids: torch.Tensor,
                        valid: torch.Tensor | None, cache: KVCache | None, start: int) -> torch.Tensor:
    """Run ``blocks[start:]`` on ``h_1, e_1, h_2, e_2, ...`` (each inserted slot sharing its token's
    position id and validity); logits [B, T, V] from the inserted slots."""
    seq = torch.stack((h, inserted.to(h.dtype).expand_as(h)), dim=2).flatten(1, 2)
    pos = position_ids.repeat_interleave(2, dim=1)
    ok = None if valid is None else valid.repeat_interleave(2, dim=1)
    out = model.run_blocks(seq, pos, start, cache=cache, valid=ok)
    return model.head(out[:, 1::2])


def _masked_ce_sum(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over unmasked ``labels`` [n, k] of ``CE(z_row, label)`` for one chunk of logits ``z`` [n, C]."""
    z = z.float()
    keep = labels >= 0
    picked = z.gather(-1, labels.clamp(min=0))
    return ((torch.logsumexp(z, dim=-1, keepdim=True) - picked) * keep).sum()


def resolve_concept_sizes(c) -> None:
    """Fill ``cocomix.n_concepts`` / ``k_concepts`` left at 0 from the SAE, in the config itself,
    so a saved config carries C and k (inference then needs no SAE)."""
    if c.n_concepts and c.k_concepts:
        return
    if not c.sae:
        raise LatentLMError("cocomix needs --cocomix.sae (or --cocomix.n_concepts and "
                            "--cocomix.k_concepts) to size its concept head")
    from latentlm.concepts.sae import load_sae

    sae = load_sae(c.sae)
    c.n_concepts = c.n_concepts or sae.n_latents
    c.k_concepts = c.k_concepts or sae.k


class Cocomix(Method):
    name = "cocomix"

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        c = cfg.cocomix
        self.insert_layer = _check_insert_layer(model, c.insert_layer)
        if c.mix == "none" and not c.concept_loss:
            raise LatentLMError("cocomix.mix=none with concept_loss=false is plain next-token prediction; "
                                "use --train.method ntp")
        resolve_concept_sizes(c)
        if c.k_concepts > c.n_concepts:
            raise LatentLMError(f"cocomix.k_concepts={c.k_concepts} exceeds n_concepts={c.n_concepts}")
        self.n_concepts, self.k = c.n_concepts, c.k_concepts
        d, std = model.cfg.n_embd, model.cfg.init_std
        # Built after the core, so the core's init is the same as every other method's.
        self.predict = nn.Linear(d, self.n_concepts)  # W_pred, b_pred
        nn.init.normal_(self.predict.weight, 0.0, std)
        nn.init.zeros_(self.predict.bias)
        if c.mix != "none":  # no unused parameters (DDP would need find_unused_parameters)
            # W_comp stored transposed (one row per concept): the k selected columns are a row gather.
            self.compress_weight = nn.Parameter(torch.empty(self.n_concepts, d))
            nn.init.normal_(self.compress_weight, 0.0, std)
            self.compress_bias = nn.Parameter(torch.zeros(d))  # b_comp
        self.b = nn.Parameter(torch.zeros(d))  # shared pre-encoder / post-decoder bias
        self._labels = None
        self.set_steering([], [])

    # --- the concept head ---------------------------------------------------------------------

    def concept_logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, mu, s)``: concept logits [B, T, C] of the stream ``h`` and its normalisation stats."""
        x_hat, mu, s = TopKSAE.normalize(h)
        return self.predict(x_hat - self.b.to(x_hat.dtype)), mu, s

    def compress(self, z: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``c_hat`` [B, T, d] from the k largest raw concept logits (gathered columns of W_comp)."""
        vals, idx = z.topk(self.k, dim=-1)
        w = self.compress_weight
        mixed = F.embedding_bag(idx.flatten(0, -2), w, per_sample_weights=vals.flatten(0, -2).to(w.dtype),
                                mode="sum").view(*z.shape[:-1], -1)
        return (mixed + self.compress_bias + self.b) * s + mu

    def set_steering(self, concept_ids: list[int], alphas: list[float], on_prompt: bool = False) -> None:
        """Multiply concept logits ``z[i]`` by ``alpha`` before the TopK during generation (:meth:`step`):
        at every position whose output picks a new token (the prompt's last one and each generated
        one), or at every prompt position too with ``on_prompt``. ``set_steering([], [])`` clears."""
        if len(concept_ids) != len(alphas):
            raise LatentLMError(f"steering needs one alpha per concept; got {len(concept_ids)} concepts "
                                f"and {len(alphas)} alphas")
        bad = [i for i in concept_ids if not 0 <= i < self.n_concepts]
        if bad:
            raise LatentLMError(f"steering concepts {bad} are not in [0, {self.n_concepts})")
        if concept_ids and self.cfg.cocomix.mix == "none":
            raise LatentLMError("cocomix.mix=none inserts no concepts, so steering cannot change the output")
        self.steer_ids, self.steer_alphas, self.steer_on_prompt = list(concept_ids), list(alphas), on_prompt

    def _steer(self, z: torch.Tensor, prefill: bool) -> torch.Tensor:
        if not self.steer_ids:
            return z
        scale = torch.ones(z.shape[-2:], device=z.device, dtype=z.dtype)  # [T, C]
        rows = slice(-1, None) if prefill and not self.steer_on_prompt else slice(None)
        scale[rows, self.steer_ids] = torch.tensor(self.steer_alphas, device=z.device, dtype=z.dtype)
        return z * scale

    # --- the student ---------------------------------------------------------------------------

    def run(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
            cache: KVCache | None = None, need_concepts: bool = True,
            steer_prefill: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] and concept logits z [B, T, C] (None when not needed: ``mix=none``
        without ``need_concepts``). ``steer_prefill`` (set by :meth:`step`) applies steering."""
        m, mix = self.model, self.cfg.cocomix.mix
        h = _lower(m, idx, position_ids, valid, cache, self.insert_layer)
        if mix == "none" and not need_concepts:
            z = None
        else:
            z, mu, s = self.concept_logits(h)
        if mix == "none":
            out = m.run_blocks(h, position_ids, self.insert_layer, cache=cache, valid=valid)
            return m.head(out), z
        steered = z if steer_prefill is None else self._steer(z, steer_prefill)
        c_hat = self.compress(steered, mu, s)
        if mix == "add":
            out = m.run_blocks(h + c_hat.to(h.dtype), position_ids, self.insert_layer, cache=cache, valid=valid)
            return m.head(out), z
        return _interleaved_logits(m, h, c_hat, position_ids, valid, cache, self.insert_layer), z

    def concept_loss(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean CE over unmasked labels [B, T, k_attr] and the top-k_attr accuracy, computed in chunks
        of ``concept_chunk`` tokens (each chunk's softmax recomputed in backward, never all kept)."""
        flat, lab = z.flatten(0, -2), labels.flatten(0, -2)
        chunk, total = self.cfg.cocomix.concept_chunk, flat.new_zeros((), dtype=torch.float32)
        recompute = torch.is_grad_enabled() and flat.requires_grad
        for i in range(0, flat.shape[0], chunk):
            part = (flat[i:i + chunk], lab[i:i + chunk])
            total = total + (checkpoint(_masked_ce_sum, *part, use_reentrant=False) if recompute
                             else _masked_ce_sum(*part))
        keep = lab >= 0
        count = keep.sum().clamp(min=1)
        with torch.no_grad():
            top = flat.topk(min(lab.shape[-1], self.n_concepts), dim=-1).indices
            hits = ((top[:, None, :] == lab[:, :, None]).any(-1) & keep).sum()
        return total / count, hits / count

    def forward(self, x: torch.Tensor, y: torch.Tensor, nll: bool = False, labels: torch.Tensor | None = None):
        c = self.cfg.cocomix
        logits, z = self.run(x, token_positions(x), need_concepts=not nll)
        losses = token_nll(logits, y)
        if nll:
            return losses
        ntp = losses.mean()
        if not c.concept_loss:
            return ntp, {"ntp_loss": ntp.detach()}
        if labels is None:
            raise LatentLMError("cocomix training needs concept labels (forward(..., labels=...) from "
                                "batch_inputs), or --cocomix.concept_loss false")
        concept, acc = self.concept_loss(z, labels)
        return ntp + c.concept_weight * concept, {"ntp_loss": ntp.detach(), "concept_loss": concept.detach(),
                                                  "concept_acc": acc}

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, windows: np.ndarray) -> dict[str, torch.Tensor]:
        """Concept labels of the batch from the label source (created on first use); none without a
        concept loss."""
        if not self.cfg.cocomix.concept_loss:
            return {}
        self.prepare_training(x.device)
        return {"labels": self._labels.labels(x, windows)}

    def prepare_training(self, device: torch.device) -> None:
        if self.cfg.cocomix.concept_loss and self._labels is None:
            from latentlm.concepts.labels import label_source  # loads a teacher or a cache: only when training

            self._labels = label_source(self.cfg, device)

    # --- cost and generation -------------------------------------------------------------------

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Blocks before L on T slots; after L, 2 slots per token over a 2T context (interleave) or
        1 over T; the concept head 2 d C (W_pred) + 2 k d (gathered W_comp, not for mix=none); the LM
        head once. Norms, the TopK and the concept cross-entropy are ignored (as in flops.py)."""
        cfg, mix, d = self.model.cfg, self.cfg.cocomix.mix, self.model.cfg.n_embd
        lower, upper = self.insert_layer, cfg.n_layer - self.insert_layer
        slots = 2 if mix == "interleave" else 1
        flops = forward_flops_per_slot(cfg, seq_len, n_layers=lower, head=False)
        flops += slots * forward_flops_per_slot(cfg, slots * seq_len, n_layers=upper, head=False)
        flops += 2.0 * d * self.n_concepts + (0.0 if mix == "none" else 2.0 * self.k * d)
        return flops + forward_flops_per_slot(cfg, 0, n_layers=0)

    def teacher_flops_per_token(self, seq_len: int) -> float:
        """Concept labels: the teacher's forward, its backward down to the SAE layer, the SAE encoder."""
        c = self.cfg.cocomix
        if not c.concept_loss:
            return 0.0
        from latentlm.concepts.attribution import label_flops_per_token
        from latentlm.concepts.teacher import run_teacher_config

        return label_flops_per_token(run_teacher_config(c), c.teacher_layer, seq_len, self.n_concepts, c.select)

    def cache_slots(self, n_tokens: int) -> int:
        """Per layer capacity: later blocks hold 2 slots per token when interleaving (earlier ones use n)."""
        return 2 * n_tokens if self.cfg.cocomix.mix == "interleave" else n_tokens

    def step(self, idx, position_ids, valid, cache):
        """Cached logits; a call on an empty cache is the prompt's prefill (for steering)."""
        return self.run(idx, position_ids, valid, cache, need_concepts=False,
                        steer_prefill=cache.lengths[0] == 0)[0]


class PauseInsert(Method):
    """CoCoMix paper's pause baseline: one learnable vector inserted after every token at the input of
    block ``cocomix.insert_layer`` (the same 2T-slot sequence and positions as CoCoMix), whose slots
    predict the next token. No concept prediction, teacher or SAE."""

    name = "pause_insert"

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        self.insert_layer = _check_insert_layer(model, cfg.cocomix.insert_layer)
        # Drawn after the core is built (same core init as every method); a residual-stream vector.
        self.pause = nn.Parameter(torch.empty(model.cfg.n_embd))
        nn.init.normal_(self.pause, 0.0, model.cfg.init_std)

    def logits(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] read at the pause slot after each token."""
        h = _lower(self.model, idx, position_ids, valid, cache, self.insert_layer)
        return _interleaved_logits(self.model, h, self.pause, position_ids, valid, cache, self.insert_layer)

    def forward(self, x: torch.Tensor, y: torch.Tensor, nll: bool = False):
        losses = token_nll(self.logits(x, token_positions(x)), y)
        if nll:
            return losses
        loss = losses.mean()
        return loss, {"ntp_loss": loss.detach()}

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Blocks before L on T slots, 2 slots per token over 2T after it, the LM head once."""
        cfg, lower = self.model.cfg, self.insert_layer
        flops = forward_flops_per_slot(cfg, seq_len, n_layers=lower, head=False)
        flops += 2 * forward_flops_per_slot(cfg, 2 * seq_len, n_layers=cfg.n_layer - lower, head=False)
        return flops + forward_flops_per_slot(cfg, 0, n_layers=0)

    def cache_slots(self, n_tokens: int) -> int:
        return 2 * n_tokens

    def step(self, idx, position_ids, valid, cache):
        return self.logits(idx, position_ids, valid, cache)
