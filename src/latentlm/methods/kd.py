"""Knowledge distillation: the baseline CoCoMix is compared against (docs/METHODS.md §2.6).

The student is trained on ``CE(student, next token) + kd.weight * tau^2 * KL(p_teacher || p_student)``
with both distributions at temperature ``tau = kd.temperature`` (the paper's: 1, where the
``tau^2`` factor, Hinton et al.'s gradient-scale correction, is 1 too). The frozen teacher
(``teacher.path``) is loaded by :meth:`validate_inputs` and kept outside the module, so it is neither
trained nor saved in checkpoints; its logits reach :meth:`loss` through ``batch_inputs``.
The teacher must use the student's tokenizer (same vocabulary, same ids). ``kd_pause``
(:class:`KDPause`) is the same loss on :class:`~latentlm.methods.cocomix.PauseInsert`'s student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass
from typing import TYPE_CHECKING

from latentlm.concepts.teacher import (HFTeacher, LatentLMTeacher, Teacher, TeacherSettings, load_teacher,
                                       run_teacher_config)
from latentlm.data.prepare import check_tokenizer, load_manifest
from latentlm.errors import LatentLMError
from latentlm.methods.base import Method, token_nll, token_positions
from latentlm.methods.cocomix import PauseInsert
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model import losses
from latentlm.model.losses import head_distill
from latentlm.model.transformer import Transformer
from latentlm.settings import Settings, setting

if TYPE_CHECKING:
    from latentlm.config import Config


@dataclass
class KDSettings(Settings):
    """The ``kd:`` section: the distillation loss (the teacher is the shared ``teacher:`` block)."""

    section, positive_fields, non_negative_fields = "kd", ("temperature",), ("weight",)
    weight: float = setting(0.1, "lambda_KD: weight of KL(teacher || student) added to the CE")
    temperature: float = setting(1.0, "softmax temperature of both distributions (tau^2 scales the KL)")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of ``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, in float32.

    Logits are [..., V]; gradients flow into the student only.
    """
    if student_logits.shape != teacher_logits.shape:
        raise LatentLMError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ; KD needs one shared vocabulary")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature ** 2


def ce_plus_kd(student_logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor,
               weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(CE + weight * KL(p_t || p_s), CE, KL)`` at temperature 1 (``weight > 0``), with one
    log-softmax of the student.

    CE + w KL = -sum_v (onehot(y) + w p_t) log p_s + w sum_v p_t log p_t: a cross-entropy against
    the soft target ``onehot(y) + w p_t`` plus a constant. Equal to ``token_nll(...).mean() + w *
    kd_loss(...)`` (tested) at ~55% of its elementwise cost over the vocabulary (measured in
    docs/BENCHMARKS.md). The two parts come back detached, for logging.
    """
    if student_logits.shape != teacher_logits.shape:
        raise LatentLMError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ; KD needs one shared vocabulary")
    s = student_logits.float().flatten(0, -2)
    with torch.no_grad():
        log_t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
        p_t = log_t.exp()
        neg_entropy = (p_t * log_t).sum(-1).mean()
        target = p_t.mul_(weight).scatter_add_(-1, y.reshape(-1, 1), torch.ones_like(p_t[:, :1]))
    total = F.cross_entropy(s, target) + weight * neg_entropy
    with torch.no_grad():
        ce = F.cross_entropy(s, y.reshape(-1))
    return total, ce, (total.detach() - ce) / weight


@torch.no_grad()
def teacher_forward_logits(teacher: Teacher, idx: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, T, V] of a frozen teacher on ``idx`` (V = its tokenizer's vocabulary)."""
    if isinstance(teacher, LatentLMTeacher):
        logits = teacher.model(idx.to(teacher.device))
    elif isinstance(teacher, HFTeacher):
        logits = teacher.model(input_ids=idx.to(teacher.device), use_cache=False).logits
    else:
        raise LatentLMError(f"cannot compute logits of teacher kind {teacher.kind!r}; use a latentlm or "
                            "Hugging Face teacher")
    return logits[..., :teacher.tokenizer.vocab_size].to(idx.device)


class TeacherDistillation:
    """Mixin for a :class:`Method`: the frozen teacher, its logits as ``batch_inputs`` and the
    ``NTP + kd.weight * KD`` loss. The teacher is a plain attribute: not a submodule, never in a checkpoint."""

    cfg: Config
    sections = {"teacher": TeacherSettings, "kd": KDSettings}
    needs_teacher = True

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        self._teacher: Teacher | None = None

    def validate_inputs(self, device: torch.device) -> None:
        """Load the frozen teacher on ``device`` and check it reads the data as the student does:
        the same vocabulary and the data's tokenizer."""
        if self._teacher is not None:
            return
        spec = self.cfg.teacher.path
        if not spec:
            raise LatentLMError(f"train.method {self.cfg.train.method} needs a teacher: set --teacher.path")
        teacher = load_teacher(spec, device=device, dtype=self.cfg.teacher.dtype)
        if teacher.tokenizer.vocab_size != self.cfg.model.vocab_size:
            raise LatentLMError(f"KD teacher {spec} has a vocabulary of {teacher.tokenizer.vocab_size} tokens, the "
                                f"student {self.cfg.model.vocab_size}; teacher and student must share a tokenizer")
        check_tokenizer(load_manifest(self.cfg.data.path), teacher.tokenizer)
        self._teacher = teacher

    def teacher(self, device: torch.device) -> Teacher:
        """The frozen teacher (loaded and checked on first use)."""
        self.validate_inputs(device)
        return self._teacher

    def teacher_flops_per_token(self, seq_len: int) -> float:
        """One full forward of the teacher (its logits) per token."""
        return forward_flops_per_slot(run_teacher_config(self.cfg), seq_len)

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, *, windows, step: int) -> dict[str, torch.Tensor]:
        return {"teacher_logits": teacher_forward_logits(self.teacher(x.device), x)}

    def distill(self, logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None):
        """``(CE + kd.weight * kd_loss, metrics)`` of the student's logits."""
        if teacher_logits is None:
            raise LatentLMError("KD training batches need teacher_logits (the trainer gets them from batch_inputs)")
        c = self.cfg.kd
        if c.temperature == 1.0 and c.weight > 0:  # the paper's setting: one fused soft-target CE
            loss, ntp, kd = ce_plus_kd(logits, y, teacher_logits, c.weight)
            return loss, {"ntp_loss": ntp, "kd_loss": kd}
        ntp = token_nll(logits, y).mean()
        kd = kd_loss(logits, teacher_logits, c.temperature)
        return ntp + c.weight * kd, {"ntp_loss": ntp.detach(), "kd_loss": kd.detach()}

    def distill_hidden(self, h: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None):
        """:meth:`distill` of the logits ``self.model.head(h)``, computed without materialising them
        (:func:`~latentlm.model.losses.head_distill`: one pass over each block of student and teacher
        logits, any ``kd.temperature``)."""
        if not (self.cfg.train.fused_loss and losses.FUSED):  # the computation before the fused one, op for op
            return self.distill(self.model.head(h), y, teacher_logits)
        if teacher_logits is None:
            raise LatentLMError("KD training batches need teacher_logits (the trainer gets them from batch_inputs)")
        c = self.cfg.kd
        loss, ntp, kd = head_distill(self.model, h, y, teacher_logits, c.weight, c.temperature)
        return loss, {"ntp_loss": ntp, "kd_loss": kd}


class KD(TeacherDistillation, Method):
    name = "kd"
    plain_lm = True  # KD changes only the loss: the checkpoint is a plain next-token LM

    cached_eval = True

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def eval_hidden(self, idx, position_ids, valid, cache):
        return self.model.hidden(idx, position_ids=position_ids, cache=cache, valid=valid)

    def loss(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        return self.distill_hidden(self.model.hidden(x), y, teacher_logits)

    def step(self, idx, position_ids, valid, cache):
        return self.model(idx, position_ids=position_ids, cache=cache, valid=valid)


class KDPause(TeacherDistillation, PauseInsert):
    """The CoCoMix paper's "KD + pause" baseline: :class:`PauseInsert`'s student (a learned vector after
    every token at the insert layer, read for the next token) trained with :class:`KD`'s loss. Its FLOPs
    are PauseInsert's plus the teacher's forward."""

    name = "kd_pause"
    sections = {**TeacherDistillation.sections, **PauseInsert.sections}

    def loss(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        return self.distill_hidden(self.hidden(x, token_positions(x)), y, teacher_logits)
