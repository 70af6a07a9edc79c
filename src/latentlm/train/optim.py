"""AdamW with the usual decay split, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from latentlm.config import TrainConfig


def build_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2: linears, embeddings) decay, biases and norm gains do not, unless
    ``weight_decay_params`` is ``all`` (every parameter decays). Fused kernels on CUDA unless ``fused=False``.
    Two parameter groups either way, so optimizer states stay interchangeable."""
    params = [p for p in module.parameters() if p.requires_grad]
    rest_decay = cfg.weight_decay if cfg.weight_decay_params == "all" else 0.0
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": rest_decay},
    ]
    if fused is None:
        fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
