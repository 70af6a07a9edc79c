"""Process-group setup and model wrapping for ``torchrun`` (DDP or FSDP2)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from latentlm.devices import resolve_device
from latentlm.errors import LatentLMError


@dataclass
class DistInfo:
    mode: str  # none | ddp | fsdp2
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def setup(mode: str, device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world > 1:
            raise LatentLMError(f"launched with WORLD_SIZE={world} but train.dist=none; "
                                "add --train.dist ddp (or fsdp2)")
        return DistInfo("none"), resolve_device(device_name)
    if "RANK" not in os.environ:
        raise LatentLMError(f"train.dist={mode} needs a torchrun launch, e.g. "
                            "torchrun --nproc_per_node 2 -m latentlm train ...")
    info = DistInfo(mode, int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def wrap(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with each transformer block and then the root sharded."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer changes during training (the RoPE tables are constants), so none is re-sent each step.
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if info.mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for block in module.model.blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    return module


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(fn: Callable[[], Any], info: DistInfo) -> None:
    """Call ``fn`` on rank 0 only; a LatentLMError it raises is raised on every rank."""
    failure = None
    if info.is_main:
        try:
            fn()
        except LatentLMError as e:
            failure = str(e)
    raise_rank0_failure(failure, info)


def raise_rank0_failure(failure: str | None, info: DistInfo) -> None:
    """Raise rank 0's one-line ``failure`` (None = success) as a LatentLMError on every rank, so a
    problem only rank 0 can see (the run lock, a full disk) never leaves the others waiting."""
    if info.enabled:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        raise LatentLMError(failure)
