"""Knowledge distillation (docs/METHODS.md §2.6): the loss by hand, and training towards a tiny teacher."""

from __future__ import annotations

import pytest
import torch

from latentlm.concepts.teacher import load_teacher
from latentlm.config import make_config
from latentlm.data.loader import TokenSplit, iter_eval_windows
from latentlm.errors import LatentLMError
from latentlm.loading import load_method
from latentlm.methods import build_method
from latentlm.methods.base import token_nll
from latentlm.methods.kd import KD, ce_plus_kd, kd_loss, teacher_forward_logits
from latentlm.train.trainer import train

from conftest import TINY_MODEL


def test_kd_loss_equals_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    for tau in (1.0, 2.0):
        p_t, p_s = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
        want = sum((p_t[b, i] * (p_t[b, i].log() - p_s[b, i].log())).sum() for b in range(2) for i in range(3)) / 6
        torch.testing.assert_close(kd_loss(s, t, tau).double(), want * tau ** 2, rtol=1e-5, atol=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_trains_only_the_student():
    s = torch.randn(4, 9, requires_grad=True)
    t = s.detach().clone().requires_grad_()
    loss = kd_loss(s, t)
    assert loss.abs().item() < 1e-6
    kd_loss(s, t + torch.randn_like(t)).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(LatentLMError, match="vocabulary"):
        kd_loss(s, torch.randn(4, 8))


@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_fused_soft_target_loss_equals_ce_plus_kd(weight):
    """The training path at tau = 1: one soft-target cross-entropy equals CE + w KL in value and in
    gradient, and returns the two parts."""
    torch.manual_seed(0)
    s, t, y = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce, kl = token_nll(s, y).mean(), kd_loss(s, t)
    total, ce_part, kl_part = ce_plus_kd(s, y, t, weight)
    torch.testing.assert_close(total, ce + weight * kl, rtol=0, atol=1e-6)
    torch.testing.assert_close((ce_part, kl_part), (ce.detach(), kl.detach()), rtol=0, atol=1e-5)
    g_fused, = torch.autograd.grad(total, s)
    g_ref, = torch.autograd.grad(ce + weight * kl, s)
    torch.testing.assert_close(g_fused, g_ref, rtol=0, atol=1e-7)
    assert not ce_part.requires_grad and not kl_part.requires_grad
    with pytest.raises(LatentLMError, match="vocabulary"):
        ce_plus_kd(s, y, torch.randn(2, 5, 10), weight)


@pytest.fixture(scope="module")
def teacher_run(byte_wiki, tmp_path_factory):
    """A tiny next-token teacher trained by the real trainer."""
    cfg = make_config(base={"model": dict(TINY_MODEL), "data": {"path": str(byte_wiki)},
                            "train": {"out_dir": str(tmp_path_factory.mktemp("teacher") / "run"), "batch_size": 4,
                                      "max_steps": 30, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                                      "eval_every": 0, "eval_batches": 1, "ckpt_every": 0, "progress": False}})
    train(cfg)
    return cfg.train.out_dir


def kl_and_ce(method, teacher, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = method.model(x)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        return kd_loss(logits, teacher_forward_logits(teacher, x)).item(), ce.item()


def test_kd_training_moves_the_student_towards_the_teacher(teacher_run, tiny_config, byte_wiki):
    cfg = tiny_config(method="kd", max_steps=15)
    cfg.teacher.path, cfg.kd.weight = teacher_run, 1.0
    torch.manual_seed(cfg.train.seed)
    initial = build_method(cfg).eval()  # the trainer's initial student (same seed)
    result = train(cfg)
    assert result["kd_loss"] > 0 and result["ntp_loss"] > 0
    student, _, _ = load_method(cfg.train.out_dir)
    assert isinstance(student, KD) and all(k.startswith("model.") for k in student.state_dict())  # no teacher saved
    teacher = load_teacher(teacher_run)
    x, y = next(iter_eval_windows(TokenSplit(byte_wiki, "val"), 64, 4))
    kl0, ce0 = kl_and_ce(initial, teacher, x, y)
    kl1, ce1 = kl_and_ce(student, teacher, x, y)
    assert kl1 < 0.7 * kl0 and ce1 < ce0 - 0.3


def test_kd_needs_a_teacher_with_the_students_vocabulary(teacher_run, tiny_config):
    x = torch.zeros(1, 8, dtype=torch.long)
    cfg = tiny_config(method="kd")
    with pytest.raises(LatentLMError, match="teacher.path"):
        build_method(cfg).batch_inputs(x, x, windows=None, step=0)
    cfg.teacher.path, cfg.model.vocab_size = teacher_run, 300
    with pytest.raises(LatentLMError, match="vocabulary of 257"):
        build_method(cfg).batch_inputs(x, x, windows=None, step=0)
