"""PonderLM-2 whose latent thoughts also carry CoCoMix concepts (docs/METHODS.md §5).

Neither paper combines the two. The model is PonderLM-2's (``ponder:`` section: K thoughts per
token, each the final-normed hidden state of the slot before it, Jacobi training, exact
sequential evaluation and generation). At the input of block ``l = ponder_concepts.insert_layer``
a :class:`~latentlm.methods.concept_head.ConceptHead` reads every *thought* slot (never a token
slot) and predicts the teacher's SAE concepts:

    z_{t,k} = W_pred (x_hat - b) + b_pred      from the thought slot (t, k) at block l   [C]

Loss: next-token CE from the last thoughts + lambda x the concept CE, every thought slot of token
t against the labels of teacher position t, the concepts the teacher's state at x_t carries for
predicting x_{t+1} (the labels CoCoMix puts on its token t, whose concept slot predicts x_{t+1}).
With ``mix`` the compressed vector is added to the thought slot's stream there
(``h <- h + c_hat``, CoCoMix's ``mix add`` on the thought slot), in every pass, sequential ones
included; steering scales chosen z before the TopK of that vector.

Built from the shared pieces: ``thought_pass`` / ``jacobi_thoughts`` / ``sequential_thoughts``
run :meth:`PonderConcepts._runner`, a slot runner that knows which of its slots are thoughts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from latentlm.concepts.attribution import label_flops_per_token
from latentlm.concepts.labels import ConceptSettings, LabelSource, label_source
from latentlm.concepts.sae import load_sae
from latentlm.concepts.teacher import TeacherSettings, run_teacher_config
from latentlm.errors import LatentLMError
from latentlm.methods.base import Method, token_nll, token_positions
from latentlm.methods.concept_head import ConceptHead, label_norm
from latentlm.methods.ponder import (JacobiEvaluation, PonderSettings, draw_train_iters, jacobi_thoughts,
                                     sequential_thoughts)
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache, Transformer
from latentlm.settings import Settings, setting

if TYPE_CHECKING:
    from latentlm.config import Config


@dataclass
class PonderConceptsSettings(Settings):
    """The ``ponder_concepts:`` section: the concept head on the thought slots (the thoughts
    themselves are set in ``ponder:``, the labels in ``concepts:``, the teacher in ``teacher:``)."""

    insert_layer: int = setting(3, "the block whose input the concept head reads (thought slots only)")
    n_concepts: int = setting(0, "C: taken from the SAE (0); stored so checkpoints load without the SAE")
    k_concepts: int = setting(0, "TopK of the predicted concepts: the SAE's k (0)")
    concept_weight: float = setting(0.1, "lambda of the concept loss")
    mix: bool = setting(True, "add the compressed concept vector to the thought slot (false: concept loss only)")
    concept_chunk: int = setting(2048, "rows (thought slots) per chunk of the C-way concept cross-entropy")
    section, positive_fields = "ponder_concepts", ("concept_chunk",)
    non_negative_fields = ("insert_layer", "n_concepts", "k_concepts", "concept_weight")

    def validate(self) -> None:
        super().validate()
        if not self.mix and self.concept_weight == 0:
            raise LatentLMError("ponder_concepts.mix=false with concept_weight=0 is plain PonderLM-2; "
                                "use --train.method ponder")


# A slot layout (T, S, first): a call's T x S slots, token-major, the slots first..S-1 of each token
# being thoughts (thought_pass's layout: slot 0 is the token).
Layout = tuple[int, int, int]


class PonderConcepts(JacobiEvaluation, Method):
    name = "ponder_concepts"
    sections = {"teacher": TeacherSettings, "concepts": ConceptSettings, "ponder": PonderSettings,
                "ponder_concepts": PonderConceptsSettings}
    needs_teacher = True
    needs_concept_labels = True
    has_concepts = True

    @classmethod
    def resolve_config(cls, cfg: Config) -> None:
        """C and k from the SAE (read on the CPU, before ``flops`` builds on the meta device); an
        explicit value must equal the SAE's. With both set nothing is read here."""
        c, sae_path = cfg.ponder_concepts, cfg.concepts.sae
        if c.n_concepts and c.k_concepts:
            return
        if not sae_path:
            raise LatentLMError(f"train.method {cfg.train.method} needs --concepts.sae (or "
                                "--ponder_concepts.n_concepts and --ponder_concepts.k_concepts) to size its concept "
                                "head")
        sae = load_sae(sae_path)
        for key, mine, theirs in (("n_concepts", c.n_concepts, sae.n_latents), ("k_concepts", c.k_concepts, sae.k)):
            if mine and mine != theirs:
                raise LatentLMError(f"ponder_concepts.{key}={mine} but the SAE {sae_path} has {theirs}; drop "
                                    f"--ponder_concepts.{key} (it is taken from the SAE) or pass the SAE it belongs to")
        c.n_concepts, c.k_concepts = sae.n_latents, sae.k

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        c = cfg.ponder_concepts
        if not 0 <= c.insert_layer < model.cfg.n_layer:
            raise LatentLMError(f"ponder_concepts.insert_layer={c.insert_layer} must name a block of the student "
                                f"(0..{model.cfg.n_layer - 1})")
        type(self).resolve_config(cfg)
        self.insert_layer, self.n_thoughts, self.mix = c.insert_layer, cfg.ponder.n_thoughts, c.mix
        # Built after the core, so the core's init is the same as every other method's.
        self.concept_head = ConceptHead(model.cfg.n_embd, c.n_concepts, c.k_concepts, model.cfg.init_std,
                                        compress=c.mix)
        self.n_concepts = c.n_concepts
        self._labels: LabelSource | None = None
        self._eval_residuals: list[torch.Tensor] = []

    # --- inputs ---------------------------------------------------------------------------------

    def validate_inputs(self, device: torch.device) -> None:
        """Load the label source (a cache, or teacher + SAE) and check its SAE against this head."""
        if self._labels is not None:
            return
        labels = label_source(self.cfg, device)
        c = self.cfg.ponder_concepts
        sizes = (("n_concepts", c.n_concepts, labels.n_latents), ("k_concepts", c.k_concepts, labels.k))
        for key, mine, theirs in sizes:
            if mine != theirs:
                raise LatentLMError(f"ponder_concepts.{key}={mine} but the concept labels come from an SAE with "
                                    f"{theirs}; drop --ponder_concepts.{key} (it is taken from the SAE)")
        self._labels = labels

    def iters_for_step(self, step: int) -> int:
        p = self.cfg.ponder
        return draw_train_iters(self.cfg.train.seed, step, p.train_iters_min, p.train_iters_max)

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, *, windows: np.ndarray, step: int):
        """This optimizer step's Jacobi n (drawn as ponder draws it), the batch's concept labels and
        the concept loss's denominator (:func:`label_norm`, all-reduced here, outside the forward)."""
        self.validate_inputs(x.device)
        labels = self._labels.labels(x, windows)
        return {"iters": self.iters_for_step(step), "labels": labels, "label_norm": label_norm(labels)}

    # --- the stack over slots ---------------------------------------------------------------------

    def _blocks(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None, cache: KVCache | None,
                lower: bool, per_block: bool) -> torch.Tensor:
        """``blocks[:l]`` (``lower``; positions added at the input, to every slot as ponder does) or ``blocks[l:]``."""
        m, l = self.model, self.insert_layer
        if lower:
            return m.run_blocks(m.add_positions(x, pos), pos, 0, l, cache=cache, valid=valid,
                                checkpoint_blocks=per_block)
        return m.run_blocks(x, pos, l, None, cache=cache, valid=valid, checkpoint_blocks=per_block)

    def _stack(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None, cache: KVCache | None,
               layout: Layout, steer: slice | None, captured: list | None) -> torch.Tensor:
        """The core over slot inputs ``x`` [B, N, d] laid out as ``layout``: blocks below l, the
        concept head on the thought slots (their z appended to ``captured`` with their stream;
        with ``mix`` their stream gains c_hat, steered at the tokens ``steer``), blocks from l on.
        ``ponder.checkpoint`` recomputes each half (pass) or each block in backward; the concept
        head stays outside the recomputed regions."""
        mode = self.cfg.ponder.checkpoint if torch.is_grad_enabled() else "none"
        if mode == "pass":
            def run(h, lower):
                return checkpoint(self._blocks, h, pos, valid, cache, lower, False, use_reentrant=False)
        else:
            def run(h, lower):
                return self._blocks(h, pos, valid, cache, lower, mode == "block")
        h = run(x, True)
        t, s, first = layout
        if first < s and (self.mix or captured is not None):
            b, n, d = h.shape
            slots = h.view(b, t, s, d)
            thoughts = slots[:, :, first:]  # [B, T, S - first, d]
            z = mu = sd = None
            if self.mix:
                head = self.concept_head
                z, mu, sd = head.logits(thoughts)
                if steer is not None:
                    z = z.clone()
                    z[:, steer] = head.steer(z[:, steer], prefill=False)  # every row given: all scaled
                thoughts = thoughts + head.compress(z, mu, sd).to(h.dtype)
                h = torch.cat([slots[:, :, :first], thoughts], dim=2).view(b, n, d)
            if captured is not None:
                captured.append((slots[:, :, first:], z))
        return run(h, False)

    def _runner(self, tokens: int, sequential: bool = False, steer: slice | None = None,
                captured: list | None = None) -> Callable:
        """A slot runner over a chunk of ``tokens`` tokens for the ponder passes, steering the
        thoughts of the chunk's tokens ``steer``. Parallel: each call holds T tokens x S slots
        (``thought_pass``'s layout, S = N / T, slot 0 of each the token). ``sequential``: the
        one-slot calls of ``sequential_thoughts``, in its order (each token, then its K thoughts)."""
        if not sequential:
            return lambda x, pos, valid, cache: self._stack(x, pos, valid, cache, (tokens, x.shape[1] // tokens, 1),
                                                            steer, captured)
        steered = set(range(tokens)[steer]) if steer is not None else set()
        calls = [0]

        def run(x, pos, valid, cache):
            i, kind = divmod(calls[0], self.n_thoughts + 1)
            calls[0] += 1
            rows = slice(None) if i in steered else None
            return self._stack(x, pos, valid, cache, (1, 1, 0 if kind else 1), rows, captured)

        return run

    # --- parallel (Jacobi) and sequential (exact) forwards --------------------------------------

    def jacobi_logits(self, x: torch.Tensor, n: int, captured: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, T, V] after K init passes and ``n`` >= 1 Jacobi iterations, and the
        Jacobi residual. ``captured`` receives ``(thought stream at l, z or None)`` of every pass,
        the final (scored) pass last: [B, T, K, d] and [B, T, K, C] there."""
        run = self._runner(x.shape[1], captured=captured)
        pos = torch.arange(x.shape[1], device=x.device)
        h, residual = jacobi_thoughts(run, self.model.norm_f, self.model.embed(x), self.n_thoughts, n, pos)
        return self.model.head(h), residual

    def _advance(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None, cache: KVCache,
                 steer: slice | None = None, captured: list | None = None) -> torch.Tensor:
        """The exact model through ``cache``: logits [B, T, V] from each token's last thought."""
        return self.model.head(self._advance_hidden(idx, position_ids, valid, cache, steer, captured))

    def _advance_hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None,
                        cache: KVCache, steer: slice | None = None, captured: list | None = None) -> torch.Tensor:
        """Each token of ``idx`` and then its K thoughts through ``cache``, one slot at a time: the last
        thoughts' outputs [B, T, d]."""
        run = self._runner(idx.shape[1], True, steer, captured)
        return sequential_thoughts(run, self.model.norm_f, self.model.embed(idx), self.n_thoughts, position_ids,
                                   valid, cache)

    def exact_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the sequential model (docs/METHODS.md §5.2)."""
        return self._advance(x, token_positions(x), None, self.new_cache(*x.shape))

    def concept_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Concept logits z [B, T, C] of the exact model at each token's last thought (inspection)."""
        captured: list = []
        self._advance(idx, token_positions(idx), None, self.new_cache(*idx.shape), captured=captured)
        z = torch.cat([self.concept_head.logits(th)[0] if zz is None else zz for th, zz in captured], dim=1)
        return z.view(idx.shape[0], idx.shape[1], self.n_thoughts, -1)[:, :, -1]

    # --- the Method seam ------------------------------------------------------------------------

    def loss(self, x: torch.Tensor, y: torch.Tensor, iters: int | None = None, labels: torch.Tensor | None = None,
             label_norm: torch.Tensor | None = None):
        """NTP on the last thoughts + lambda x the concept CE of every thought slot of token t against
        ``labels[:, t]`` (docs/METHODS.md §5.3). ``iters`` is n (default ``train_iters_max``);
        ``label_norm`` (from :meth:`batch_inputs`) counts the valid labels of the global batch."""
        if labels is None:
            raise LatentLMError("ponder_concepts training needs concept labels (loss(..., labels=...) from "
                                "batch_inputs)")
        p, c, k = self.cfg.ponder, self.cfg.ponder_concepts, self.n_thoughts
        n = p.train_iters_max if iters is None else iters
        captured: list = []
        logits, residual = self.jacobi_logits(x, n, captured)
        thoughts, z = captured[-1]  # the scored pass: [B, T, K, d], [B, T, K, C] (None without mix)
        if z is None:
            z = self.concept_head.logits(thoughts)[0]
        ntp = token_nll(logits, y).mean()
        targets = labels[:, :, None].expand(-1, -1, k, -1)  # thought (t, j) <- teacher position t
        norm = None if label_norm is None else label_norm * k
        concept, acc = self.concept_head.loss(z, targets, c.concept_chunk, norm)
        return ntp + c.concept_weight * concept, {"ntp_loss": ntp.detach(), "concept_loss": concept.detach(),
                                                  "concept_acc": acc, "jacobi_residual": residual,
                                                  "jacobi_iters": float(n)}

    # --- cost -------------------------------------------------------------------------------------

    def _ponder_flops(self, context: int, n: float) -> float:
        """PonderLM-2's passes (docs/METHODS.md §3.2): init passes of kT slots, n + 1 of (K+1)T, the LM head."""
        k, cfg = self.n_thoughts, self.model.cfg
        init = sum(j * forward_flops_per_slot(cfg, j * context, head=False) for j in range(1, k + 1))
        full = (k + 1) * forward_flops_per_slot(cfg, (k + 1) * context, head=False)
        return init + (n + 1) * full + forward_flops_per_slot(cfg, 0, n_layers=0)

    def forward_flops_per_token(self, seq_len: int, n: float | None = None) -> float:
        """One Jacobi forward with ``n`` iterations (default: the mean drawn n) plus the concept head
        (2 d C, and 2 k d for the gathered W_comp with ``mix``) on each thought slot that runs it:
        with ``mix`` every pass's, K (K - 1) / 2 + (n + 1) K per token; without, the scored pass's K."""
        p, k = self.cfg.ponder, self.n_thoughts
        n = (p.train_iters_min + p.train_iters_max) / 2 if n is None else n
        heads = k * (k - 1) / 2 + (n + 1) * k if self.mix else k
        return self._ponder_flops(seq_len, n) + heads * self.concept_head.flops_per_token()

    def train_flops_per_token(self, seq_len: int) -> float:
        """3 x forward at the mean of the drawn n (gradients flow through every pass)."""
        return 3.0 * self.forward_flops_per_token(seq_len)

    def teacher_flops_per_token(self, seq_len: int) -> float:
        """Concept labels: the teacher's forward, its backward down to the SAE layer, the SAE encoder."""
        c = self.cfg.concepts
        return label_flops_per_token(run_teacher_config(self.cfg), c.layer, seq_len, self.n_concepts, c.select)

    def infer_flops_per_token(self, context: int) -> float:
        """Sequential generation: K + 1 slots per token through every block over a (K+1) x ``context``
        cache, the LM head once, and with ``mix`` the concept head on the K thoughts."""
        k, cfg = self.n_thoughts, self.model.cfg
        heads = k * self.concept_head.flops_per_token() if self.mix else 0.0
        return (k + 1) * forward_flops_per_slot(cfg, (k + 1) * context, head=False) + \
            forward_flops_per_slot(cfg, 0, n_layers=0) + heads

    # --- generation ---------------------------------------------------------------------------------

    def set_steering(self, concept_ids: list[int], alphas: list[float], on_prompt: bool = False) -> None:
        """Steer generation (:meth:`step`): z[i] *= alpha before the TopK at the thought slots of each
        token whose output is sampled (a prompt's last, each generated one; every prompt token too
        with ``on_prompt``)."""
        if concept_ids and not self.mix:
            raise LatentLMError("ponder_concepts.mix=false mixes no concepts into the thoughts, so steering cannot "
                                "change the output")
        self.concept_head.set_steering(concept_ids, alphas, on_prompt)

    def cache_slots(self, n_tokens: int) -> int:
        return n_tokens * (self.n_thoughts + 1)

    def step(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """Advance the cache by ``idx`` [B, T]: sequentially (exact), or for a prompt on an empty cache
        with ``ponder.prefill jacobi`` by ``eval_iters`` Jacobi iterations whose final pass fills the
        cache (as ponder does). A call on an empty cache is the prompt's prefill (for steering)."""
        p, head = self.cfg.ponder, self.concept_head
        prefill = cache.lengths[0] == 0
        steer = None
        if head.steer_ids:
            steer = slice(-1, None) if prefill and not head.steer_on_prompt else slice(None)
        if idx.shape[1] > 1 and p.prefill == "jacobi" and prefill:
            run = self._runner(idx.shape[1], steer=steer)
            h, _ = jacobi_thoughts(run, self.model.norm_f, self.model.embed(idx), self.n_thoughts, p.eval_iters,
                                   position_ids, valid, cache)
            return self.model.head(h)
        return self._advance(idx, position_ids, valid, cache, steer)
