"""Measurement helpers shared by the benchmarks (``benchmarks/``) and the performance tests.

They answer questions a speed number alone cannot: how many bytes of activations a training
forward really keeps for backward, how fast this device multiplies large matrices (the
ceiling MFU is judged against when no datasheet peak applies), and whether every attention
call a method makes could run on the fast fused kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def emit_json(dest: str, doc: dict[str, Any]) -> None:
    """A benchmark's ``--json`` output: printed for ``-``, else written to the file ``dest``."""
    import json
    from pathlib import Path

    text = json.dumps(doc, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``forward()`` and count the bytes of distinct storages autograd saves for backward,
    leaving out the storages of ``exclude`` (the parameters: they exist whether or not a forward
    runs). Returns ``(forward's result, bytes)``. Deterministic, so meaningful on a busy CPU."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    return out, sum(n for ptr, n in seen.items() if ptr not in skip)


def matmul_flops_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` square ``n x n`` matmuls: what this device really sustains on
    dense work (the bound a model's MFU is compared with when no datasheet peak applies)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, lazy init)
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


@dataclass
class AttentionCall:
    """One ``scaled_dot_product_attention`` call, as the fast-kernel check needs it."""

    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]
    has_mask: bool
    is_causal: bool
    flash_ok: bool | None = None  # CUDA only: did the flash kernel accept this very call?


class _RecordAttention(TorchFunctionMode):
    def __init__(self, try_flash: bool):
        super().__init__()
        self.calls: list[AttentionCall] = []
        self.try_flash = try_flash

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            call = AttentionCall(tuple(q.shape), tuple(k.shape), (q.dtype, k.dtype, v.dtype), mask is not None,
                                 bool(causal))
            if self.try_flash:
                call.flash_ok = _flash_accepts(q, k, v, mask, bool(causal))
            self.calls.append(call)
        return func(*args, **kwargs)


def _flash_accepts(q, k, v, mask, causal: bool) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask, is_causal=causal)
        return True
    except RuntimeError:
        return False


def record_attention_calls(fn: Callable[[], Any]) -> tuple[Any, list[AttentionCall]]:
    """Run ``fn()`` and record every attention call it makes. On CUDA each call is also replayed
    with only the flash kernel enabled (``flash_ok``): the check that the fast path is taken."""
    with _RecordAttention(try_flash=torch.cuda.is_available()) as mode:
        out = fn()
    return out, mode.calls


def flash_blockers(call: AttentionCall) -> list[str]:
    """Why PyTorch's CUDA flash kernel would refuse ``call`` (empty: it qualifies). The rules are
    the kernel's documented input constraints, so they can be checked on any device."""
    reasons = []
    if call.has_mask:
        reasons.append("explicit attn_mask (flash takes none; is_causal only)")
    if len(set(call.dtypes)) > 1:
        reasons.append(f"mixed q/k/v dtypes {call.dtypes}")
    if call.dtypes[0] not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {call.dtypes[0]} (flash needs float16 or bfloat16)")
    head_dim = call.query_shape[-1]
    if head_dim % 8 or head_dim > 256:
        reasons.append(f"head_dim {head_dim} (flash needs a multiple of 8, at most 256)")
    if len(call.query_shape) != 4:
        reasons.append(f"{len(call.query_shape)}-d query (flash needs [B, H, T, hd])")
    return reasons
