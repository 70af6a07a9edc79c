"""CoCoMix student (arXiv 2502.08524; docs/METHODS.md §2.2-2.3, 2.6-2.7) and its pause baseline.

At the input of block ``L = cocomix.insert_layer`` the residual stream ``h`` [B, T, d] is read
by a :class:`~latentlm.methods.concept_head.ConceptHead` (concept logits z, TopK, compressed
vector c_hat). With ``mix="interleave"`` the blocks from L on run on ``h_1, c_1, h_2, c_2, ...``
(2T slots, plain causal attention, ``c_t`` sharing ``h_t``'s position id; learned positions are
added at the input only, so concept slots get none) and the concept slots' outputs predict the
next token. ``mix="add"`` continues on ``h + c_hat`` (T slots); ``mix="none"`` inserts nothing.

Loss: NTP + ``concept_weight`` x the concept cross-entropy, the mean over unmasked labels
(label != -1) of the whole data-parallel batch (:func:`~latentlm.methods.concept_head.label_norm`)
of ``CE(z_t, label_{t,i})``, which is ``(1/k_attr) sum_i CE`` averaged over
tokens when nothing is masked (``concept_norm="position"``: the sum over every position's k_attr
label slots, masked ones adding zero, as the authors' code weighs it). ``concept_acc`` is the fraction
of unmasked labels among the student's top-``k_attr`` concept logits (chance ~ k_attr / C). Labels come
from the ``concepts:`` section (a teacher's SAE, on the fly or from a cache); the teacher from ``teacher:``.

``concept_target`` ``hidden_l1`` / ``hidden_l2`` / ``hidden_cosine`` is the paper's Fig. 6b ablation:
the head (:class:`~latentlm.methods.concept_head.HiddenHead`) predicts the teacher's normalised hidden
state after block ``concepts.layer`` (read on the fly, no SAE) with that loss, and inserts a dense map
of its prediction; ``n_concepts`` is then the teacher's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn as nn

from latentlm.concepts.attribution import label_flops_per_token
from latentlm.concepts.labels import ConceptSettings, LabelSource, TeacherHidden, label_source
from latentlm.concepts.sae import load_sae
from latentlm.concepts.teacher import TeacherSettings, run_teacher_config, teacher_model_config
from latentlm.errors import LatentLMError
from latentlm.methods.base import Method, token_nll, token_positions
from latentlm.methods.concept_head import ConceptHead, HiddenHead, label_norm
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.losses import head_cross_entropy
from latentlm.model.transformer import KVCache, Transformer
from latentlm.settings import Settings, setting

if TYPE_CHECKING:
    from latentlm.config import Config


@dataclass
class CocomixSettings(Settings):
    """The ``cocomix:`` section: the student's concept head and how its vector is mixed in."""

    insert_layer: int = setting(3, "the student block whose input receives the continuous concepts")
    n_concepts: int = setting(0, "C: 0 = the SAE's (a hidden target: the teacher width); stored so checkpoints load alone")
    k_concepts: int = setting(0, "TopK of the predicted concepts: 0 = the SAE's k")
    concept_weight: float = setting(0.1, "lambda of the concept loss")
    mix: Literal["interleave", "add", "none"] = setting("interleave", "how the concept vector enters the stream; "
                                                        "none = concept loss only")
    concept_loss: bool = setting(True, "train the concept head on the labels; false = insertion only")
    concept_chunk: int = setting(2048, "tokens per chunk of the C-way concept cross-entropy (memory)")
    concept_norm: Literal["label", "position"] = setting("label", "concept CE denominator: label = the unmasked labels "
                                                         "(ours); position = every position's k_attr slots (the authors')")
    concept_target: Literal["concepts", "hidden_l1", "hidden_l2", "hidden_cosine"] = setting(
        "concepts", "what the head predicts: SAE concepts (CoCoMix), or the teacher's hidden state with an l1 / l2 / "
        "cosine loss (the paper's Fig. 6b ablation)")
    section, positive_fields = "cocomix", ("concept_chunk",)
    non_negative_fields = ("insert_layer", "n_concepts", "k_concepts", "concept_weight")

    @property
    def hidden_loss(self) -> str | None:
        """l1 / l2 / cosine when the head predicts the teacher's hidden state, else None."""
        return self.concept_target.removeprefix("hidden_") if self.concept_target != "concepts" else None

    def validate(self) -> None:
        super().validate()
        if self.mix == "none" and not self.concept_loss:
            raise LatentLMError("cocomix.mix=none with concept_loss=false is plain next-token prediction; "
                                "use --train.method ntp")
        if self.hidden_loss and not self.concept_loss:
            raise LatentLMError(f"cocomix.concept_target={self.concept_target} sets what the concept loss predicts; "
                                "it needs cocomix.concept_loss true")


@dataclass
class PauseInsertSettings(Settings):
    """The ``pause_insert:`` section (CoCoMix's pause baselines)."""

    section, non_negative_fields = "pause_insert", ("insert_layer",)
    insert_layer: int = setting(3, "the student block whose input receives the pause vector (match cocomix's)")


def check_insert_layer(model: Transformer, section: str, layer: int) -> int:
    if not 0 <= layer < model.cfg.n_layer:
        raise LatentLMError(f"{section}.insert_layer={layer} must name a block of the student "
                            f"(0..{model.cfg.n_layer - 1})")
    return layer


def lower_stream(model: Transformer, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None,
                 cache: KVCache | None, end: int) -> torch.Tensor:
    """Embed tokens (positions at the input) and run ``blocks[:end]``: the stream entering block ``end``."""
    x = model.add_positions(model.embed(idx), position_ids)
    return model.run_blocks(x, position_ids, 0, end, cache=cache, valid=valid)


def interleaved_logits(model: Transformer, h: torch.Tensor, inserted: torch.Tensor, position_ids: torch.Tensor,
                       valid: torch.Tensor | None, cache: KVCache | None, start: int) -> torch.Tensor:
    """Run ``blocks[start:]`` on ``h_1, e_1, h_2, e_2, ...`` (each inserted slot sharing its token's
    position id and validity); logits [B, T, V] from the inserted slots."""
    return model.head(interleaved_hidden(model, h, inserted, position_ids, valid, cache, start))


def interleaved_hidden(model: Transformer, h: torch.Tensor, inserted: torch.Tensor, position_ids: torch.Tensor,
                       valid: torch.Tensor | None, cache: KVCache | None, start: int) -> torch.Tensor:
    """:func:`interleaved_logits` before the head: the inserted slots' outputs [B, T, d]."""
    seq = torch.stack((h, inserted.to(h.dtype).expand_as(h)), dim=2).flatten(1, 2)
    pos = position_ids.repeat_interleave(2, dim=1)
    ok = None if valid is None else valid.repeat_interleave(2, dim=1)
    return model.run_blocks(seq, pos, start, cache=cache, valid=ok)[:, 1::2]


def insert_flops_per_token(cfg, insert_layer: int, slots: int, seq_len: int) -> float:
    """Blocks before ``insert_layer`` on T slots, ``slots`` per token over a ``slots`` x T context after
    it, the LM head once (the shared cost of CoCoMix and its pause baselines)."""
    flops = forward_flops_per_slot(cfg, seq_len, n_layers=insert_layer, head=False)
    flops += slots * forward_flops_per_slot(cfg, slots * seq_len, n_layers=cfg.n_layer - insert_layer, head=False)
    return flops + forward_flops_per_slot(cfg, 0, n_layers=0)


class Cocomix(Method):
    name = "cocomix"
    sections = {"teacher": TeacherSettings, "concepts": ConceptSettings, "cocomix": CocomixSettings}
    needs_teacher = True
    needs_concept_labels = True
    has_concepts = True

    @classmethod
    def resolve_config(cls, cfg: Config) -> None:
        """C and k come from the SAE (read on the CPU; ``flops`` builds on the meta device afterwards);
        an explicit value must equal the SAE's. With both set (a saved config, a FLOP count of a paper
        shape) nothing is read here; training checks them against the labels' SAE."""
        c, sae_path = cfg.cocomix, cfg.concepts.sae
        if c.hidden_loss:
            # The head's width is the teacher's (its shape only: the teacher is not loaded), recorded as
            # n_concepts with k_concepts 0, which marks it resolved (a saved config needs no teacher). A
            # k_concepts left from the concept presets means n_concepts is an SAE's C: read the teacher.
            if c.n_concepts and not c.k_concepts:
                return
            if not cfg.teacher.path:
                raise LatentLMError(f"cocomix.concept_target={c.concept_target} predicts the teacher's hidden "
                                    "state: set --teacher.path (or --cocomix.n_concepts to its width and "
                                    "--cocomix.k_concepts 0)")
            c.n_concepts, c.k_concepts = teacher_model_config(cfg.teacher.path).n_embd, 0
            return
        if c.n_concepts and c.k_concepts:
            return  # e.g. a saved config: sizes known; validate_inputs checks them against the labels' SAE
        if not sae_path:
            raise LatentLMError(f"train.method {cfg.train.method} needs --concepts.sae (or --cocomix.n_concepts and "
                                "--cocomix.k_concepts) to size its concept head")
        sae = load_sae(sae_path)  # leaves the RNG alone: the init must not depend on where C and k came from
        for key, mine, theirs in (("n_concepts", c.n_concepts, sae.n_latents), ("k_concepts", c.k_concepts, sae.k)):
            if mine and mine != theirs:
                raise LatentLMError(f"cocomix.{key}={mine} but the SAE {sae_path} has {theirs}; drop "
                                    f"--cocomix.{key} (it is taken from the SAE) or pass the SAE it belongs to")
        c.n_concepts, c.k_concepts = sae.n_latents, sae.k

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        c = cfg.cocomix
        self.insert_layer = check_insert_layer(model, "cocomix", c.insert_layer)
        type(self).resolve_config(cfg)
        # Built after the core, so the core's init is the same as every other method's.
        if c.hidden_loss:
            self.concept_head = HiddenHead(model.cfg.n_embd, c.n_concepts, model.cfg.init_std,
                                           compress=c.mix != "none")
            self.has_concepts = False  # nothing to inspect or steer
        else:
            self.concept_head = ConceptHead(model.cfg.n_embd, c.n_concepts, c.k_concepts, model.cfg.init_std,
                                            compress=c.mix != "none")
        self.n_concepts = c.n_concepts
        self._labels: LabelSource | TeacherHidden | None = None

    @classmethod
    def upgrade_state_dict(cls, state):
        """latentlm 0.1 kept the concept head's parameters at the top level: nest them in ``concept_head``."""
        return {f"concept_head.{k}" if k in _LEGACY_HEAD_KEYS else k: v for k, v in state.items()}

    # --- inputs ---------------------------------------------------------------------------------

    def validate_inputs(self, device: torch.device) -> None:
        """Load the label source (a cache, or teacher + SAE) and check it against the run: data and
        teacher tokenizer, SAE and teacher, and the concept count against this head."""
        if not self.cfg.cocomix.concept_loss or self._labels is not None:
            return
        c = self.cfg.cocomix
        if c.hidden_loss:
            self._labels = TeacherHidden(self.cfg, device, c.n_concepts, f"cocomix.concept_target={c.concept_target}")
            return
        labels = label_source(self.cfg, device)
        for key, mine, theirs in (("n_concepts", c.n_concepts, labels.n_latents), ("k_concepts", c.k_concepts, labels.k)):
            if mine != theirs:
                raise LatentLMError(f"cocomix.{key}={mine} but the concept labels come from an SAE with {theirs}; "
                                    f"drop --cocomix.{key} (it is taken from the SAE)")
        self._labels = labels

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, *, windows: np.ndarray, step: int):
        """Concept labels of the batch's windows (the source is loaded on first use) and the concept
        loss's denominator (:func:`label_norm`: the global count of valid labels, all-reduced here,
        outside the compiled and wrapped forward); none without a concept loss."""
        c = self.cfg.cocomix
        if not c.concept_loss:
            return {}
        self.validate_inputs(x.device)
        if c.hidden_loss:
            return {"hidden_target": self._labels.targets(x)}
        # y only when the last position needs it: a label source written for the 2-argument call still works
        extra = (y,) if self.cfg.concepts.last_position == "extra_token" else ()
        labels = self._labels.labels(x, windows, *extra)
        return {"labels": labels, "label_norm": label_norm(labels, c.concept_norm)}

    # --- the student ---------------------------------------------------------------------------

    def set_steering(self, concept_ids: list[int], alphas: list[float], on_prompt: bool = False) -> None:
        """Steer generation (:meth:`step`) through the concept head (:meth:`ConceptHead.set_steering`)."""
        if concept_ids and self.cfg.cocomix.mix == "none":
            raise LatentLMError("cocomix.mix=none inserts no concepts, so steering cannot change the output")
        self.concept_head.set_steering(concept_ids, alphas, on_prompt)

    def run(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
            cache: KVCache | None = None, need_concepts: bool = True,
            steer_prefill: bool | None = None, lm_head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] (with ``lm_head=False`` the stream [B, T, d] the head reads) and concept
        logits z [B, T, C] (None when not needed: ``mix=none`` without ``need_concepts``).
        ``steer_prefill`` (set by :meth:`step`) applies steering."""
        m, mix, head = self.model, self.cfg.cocomix.mix, self.concept_head
        out_head = m.head if lm_head else (lambda out: out)
        h = lower_stream(m, idx, position_ids, valid, cache, self.insert_layer)
        z = mu = s = None
        if mix != "none" or need_concepts:
            z, mu, s = head.logits(h)
        if mix == "none":
            out = m.run_blocks(h, position_ids, self.insert_layer, cache=cache, valid=valid)
            return out_head(out), z
        c_hat = head.compress(z if steer_prefill is None else head.steer(z, steer_prefill), mu, s)
        if mix == "add":
            out = m.run_blocks(h + c_hat.to(h.dtype), position_ids, self.insert_layer, cache=cache, valid=valid)
            return out_head(out), z
        return out_head(interleaved_hidden(m, h, c_hat, position_ids, valid, cache, self.insert_layer)), z

    def concept_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Concept logits z [B, T, C] the student predicts at every token of ``idx`` (inspection)."""
        return self.run(idx, token_positions(idx), need_concepts=True)[1]

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, token_positions(x), need_concepts=False)[0]

    cached_eval = True

    def eval_hidden(self, idx, position_ids, valid, cache):
        return self.run(idx, position_ids, valid, cache, need_concepts=False, lm_head=False)[0]  # never steered

    def loss(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None = None,
             label_norm: torch.Tensor | None = None, hidden_target: torch.Tensor | None = None):
        """NTP + lambda x the concept CE; ``label_norm`` (from :meth:`batch_inputs`) divides the
        concept sums, by default this batch's own count of valid labels. With a hidden-state target,
        NTP + lambda x its l1 / l2 / cosine loss against ``hidden_target``."""
        c = self.cfg.cocomix
        hidden, z = self.run(x, token_positions(x), need_concepts=True, lm_head=False)
        ntp = head_cross_entropy(self.model, hidden, y, fused=self.cfg.train.fused_loss)
        if not c.concept_loss:
            return ntp, {"ntp_loss": ntp.detach()}
        if c.hidden_loss:
            if hidden_target is None:
                raise LatentLMError("this cocomix run needs the teacher's hidden states (loss(..., hidden_target=...) "
                                    "from batch_inputs)")
            hidden = HiddenHead.loss(z, hidden_target, c.hidden_loss)
            return ntp + c.concept_weight * hidden, {"ntp_loss": ntp.detach(), "hidden_loss": hidden.detach()}
        if labels is None:
            raise LatentLMError("cocomix training needs concept labels (loss(..., labels=...) from "
                                "batch_inputs), or --cocomix.concept_loss false")
        # concept_acc stays the fraction of unmasked labels found, whatever divides the loss
        acc_norm = None if c.concept_norm == "label" else (labels >= 0).sum().clamp(min=1)
        concept, acc = self.concept_head.loss(z, labels, c.concept_chunk, label_norm, acc_norm,
                                              fused=self.cfg.train.fused_loss)
        return ntp + c.concept_weight * concept, {"ntp_loss": ntp.detach(), "concept_loss": concept.detach(),
                                                  "concept_acc": acc}

    # --- cost and generation -------------------------------------------------------------------

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Blocks before L on T slots; after L, 2 slots per token over a 2T context (interleave) or
        1 over T; the concept head (:meth:`ConceptHead.flops_per_token`); the LM head once. Norms,
        the TopK and the concept cross-entropy are ignored (as in flops.py)."""
        slots = 2 if self.cfg.cocomix.mix == "interleave" else 1
        return insert_flops_per_token(self.model.cfg, self.insert_layer, slots, seq_len) + \
            self.concept_head.flops_per_token()

    def teacher_flops_per_token(self, seq_len: int) -> float:
        """Concept labels: the teacher's forward, its backward down to the SAE layer, the SAE encoder."""
        if not self.cfg.cocomix.concept_loss:
            return 0.0
        c = self.cfg.concepts
        if self.cfg.cocomix.hidden_loss:  # the teacher's forward up to the layer it is read at, no SAE
            return forward_flops_per_slot(run_teacher_config(self.cfg), seq_len, n_layers=c.layer + 1, head=False)
        return label_flops_per_token(run_teacher_config(self.cfg), c.layer, seq_len, self.n_concepts, c.select,
                                     c.acts)

    def cache_slots(self, n_tokens: int) -> int:
        """Per layer capacity: later blocks hold 2 slots per token when interleaving (earlier ones use n)."""
        return 2 * n_tokens if self.cfg.cocomix.mix == "interleave" else n_tokens

    def step(self, idx, position_ids, valid, cache):
        """Cached logits; a call on an empty cache is the prompt's prefill (for steering)."""
        return self.run(idx, position_ids, valid, cache, need_concepts=False,
                        steer_prefill=cache.lengths[0] == 0)[0]


# latentlm 0.1 names of ConceptHead's parameters (then at the top of the state dict).
_LEGACY_HEAD_KEYS = ("predict.weight", "predict.bias", "compress_weight", "compress_bias", "b")


class PauseInsert(Method):
    """CoCoMix paper's pause baseline: one learnable vector inserted after every token at the input of
    block ``pause_insert.insert_layer`` (the same 2T-slot sequence and positions as CoCoMix), whose
    slots predict the next token. No concept prediction, teacher or SAE."""

    name = "pause_insert"
    sections = {"pause_insert": PauseInsertSettings}

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        self.insert_layer = check_insert_layer(model, "pause_insert", cfg.pause_insert.insert_layer)
        # Drawn after the core is built (same core init as every method); a residual-stream vector.
        self.pause = nn.Parameter(torch.empty(model.cfg.n_embd))
        nn.init.normal_(self.pause, 0.0, model.cfg.init_std)

    def logits(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] read at the pause slot after each token."""
        return self.model.head(self.hidden(idx, position_ids, valid, cache))

    def hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """:meth:`logits` before the head: the pause slots' outputs [B, T, d]."""
        h = lower_stream(self.model, idx, position_ids, valid, cache, self.insert_layer)
        return interleaved_hidden(self.model, h, self.pause, position_ids, valid, cache, self.insert_layer)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, token_positions(x))

    cached_eval = True

    def eval_hidden(self, idx, position_ids, valid, cache):
        return self.hidden(idx, position_ids, valid, cache)

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        loss = head_cross_entropy(self.model, self.hidden(x, token_positions(x)), y,
                                  fused=self.cfg.train.fused_loss)
        return loss, {"ntp_loss": loss.detach()}

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Blocks before L on T slots, 2 slots per token over 2T after it, the LM head once."""
        return insert_flops_per_token(self.model.cfg, self.insert_layer, 2, seq_len)

    def cache_slots(self, n_tokens: int) -> int:
        return 2 * n_tokens

    def step(self, idx, position_ids, valid, cache):
        return self.logits(idx, position_ids, valid, cache)
