"""KD + pause (CoCoMix paper baseline): PauseInsert's student with KD's loss, by hand, trained
towards a tiny teacher with the real trainer, FLOPs, and cached generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentlm.concepts.teacher import load_teacher
from latentlm.config import make_config
from latentlm.data.loader import TokenSplit, iter_eval_windows
from latentlm.errors import LatentLMError
from latentlm.loading import load_method
from latentlm.methods import build_method
from latentlm.methods.cocomix import PauseInsert
from latentlm.methods.kd import KDPause, kd_loss, teacher_forward_logits
from latentlm.train.trainer import train

from test_kd import teacher_run  # noqa: F401  (the module-scoped tiny teacher fixture)

from conftest import assert_cached_matches_parallel

VOCAB = 61


def tiny(method: str = "kd_pause", kd_weight: float = 0.3) -> PauseInsert:
    """3 layers, pause at block 1, d 32, a wide init (outputs far from uniform)."""
    torch.manual_seed(0)
    cfg = make_config(overrides=["--train.method", method, "--model.n_layer", "3", "--model.n_embd", "32",
                                 "--model.n_head", "2", "--model.block_size", "32", "--model.vocab_size", str(VOCAB),
                                 "--model.init_std", "0.1", "--pause_insert.insert_layer", "1",
                                 "--kd.weight", str(kd_weight), "--kd.temperature", "2.0"])
    return build_method(cfg).eval()


def positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1])[None].expand(x.shape[0], -1)


def test_loss_is_pause_ce_plus_weighted_kd():
    method = tiny()
    assert isinstance(method, KDPause) and isinstance(method, PauseInsert)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    teacher = torch.randn(2, 8, VOCAB, generator=torch.Generator().manual_seed(2))
    loss, metrics = method(x, y, teacher_logits=teacher)
    logits = method.logits(x, positions(x))
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    kd = kd_loss(logits, teacher, 2.0)
    torch.testing.assert_close(loss, ce + 0.3 * kd)
    torch.testing.assert_close(metrics["kd_loss"], kd)
    torch.testing.assert_close(metrics["ntp_loss"], ce)
    assert kd > 0.1
    torch.testing.assert_close(method(x, y, nll=True), F.cross_entropy(logits.transpose(1, 2), y, reduction="none"))
    with pytest.raises(LatentLMError, match="teacher_logits"):
        method(x, y)
    # The pause student's cost: PauseInsert's FLOPs (the teacher's forward is not counted).
    assert method.train_flops_per_token(8) == tiny("pause_insert").train_flops_per_token(8)
    assert method.cache_slots(5) == 10


def test_cached_generation_matches_parallel_forward():
    method = tiny()
    assert_cached_matches_parallel(method, [[3, 14, 15, 9]], lambda x: method.logits(x, positions(x)), 4)


def kl_to_teacher(method: KDPause, teacher, x: torch.Tensor) -> float:
    with torch.no_grad():
        return kd_loss(method.logits(x, positions(x)), teacher_forward_logits(teacher, x)).item()


def test_training_moves_the_pause_student_towards_the_teacher(teacher_run, tiny_config, byte_wiki):  # noqa: F811
    cfg = tiny_config(method="kd_pause", max_steps=15)
    cfg.teacher.path, cfg.kd.weight, cfg.pause_insert.insert_layer = teacher_run, 1.0, 1
    torch.manual_seed(cfg.train.seed)
    initial = build_method(cfg).eval()  # the trainer's initial student (same seed)
    result = train(cfg)
    assert result["kd_loss"] > 0 and result["ntp_loss"] > 0
    student, _, _ = load_method(cfg.train.out_dir)
    assert isinstance(student, KDPause)
    assert {k for k in student.state_dict() if not k.startswith("model.")} == {"pause"}  # no teacher saved
    teacher = load_teacher(teacher_run)
    x, _ = next(iter_eval_windows(TokenSplit(byte_wiki, "val"), 64, 4))
    assert kl_to_teacher(student, teacher, x) < 0.7 * kl_to_teacher(initial, teacher, x)
