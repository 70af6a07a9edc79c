"""The one training loop. It knows nothing about methods beyond the ``Method`` seam:
``loss, metrics = method(x, y)`` and ``method.train_flops_per_token(seq_len)``."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from latentlm.config import Config, save_yaml
from latentlm.data.loader import TokenSplit, WindowLoader
from latentlm.data.prepare import check_tokenizer, load_manifest, tokenizer_for
from latentlm.errors import LatentLMError
from latentlm.eval.perplexity import evaluate_tokens
from latentlm.methods import build_method
from latentlm.model.flops import device_peak_flops
from latentlm.train import checkpoint as ckpt_io
from latentlm.train import distributed as dist_
from latentlm.train.metrics import MetricLogger
from latentlm.train.optim import build_optimizer, lr_at


class NonFiniteLossError(LatentLMError):
    pass


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default (``auto``); plain float32 on CPU unless asked."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: Config, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train ``cfg.train.method`` on ``cfg.data.path``; return the final metrics.

    ``resume`` continues from the run directory's latest checkpoint. ``stop_after`` ends the
    run (with a checkpoint) after that many optimizer steps without changing the schedule,
    which is how an interrupted run is simulated in tests.
    """
    tc = cfg.train
    info, device = dist_.setup(tc.dist, tc.device)
    try:
        return _train(cfg, info, device, resume, stop_after)
    finally:
        dist_.teardown(info)


def _train(cfg: Config, info: dist_.DistInfo, device: torch.device, resume: bool,
           stop_after: int | None) -> dict[str, Any]:
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    data_manifest = load_manifest(cfg.data.path, verify=cfg.data.verify)
    tokenizer = tokenizer_for(data_manifest, cfg.data.path)
    check_tokenizer(data_manifest, tokenizer, vocab_size=cfg.model.vocab_size)
    seq_len = cfg.seq_len
    loader = WindowLoader(TokenSplit(cfg.data.path, "train"), seq_len, tc.batch_size, seed=tc.seed,
                          rank=info.rank, world_size=info.world_size, pin_memory=device.type == "cuda")
    val_split = TokenSplit(cfg.data.path, "val")

    existing = ckpt_io.latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise LatentLMError(f"{run_dir} already holds checkpoints; pass --resume to continue it "
                            "or choose another --train.out_dir")
    if resume and existing is None:
        raise LatentLMError(f"--resume given but {run_dir} holds no checkpoint to resume from")

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    method = build_method(cfg).to(device)
    module = dist_.wrap(method, info, device)
    optimizer = build_optimizer(module, tc, device, fused=None if info.mode != "fsdp2" else False)
    torch.manual_seed(tc.seed + info.rank)  # per-rank dropout streams

    step, tokens_seen, bad_in_row, skipped = 0, 0, 0, 0
    if existing is not None:
        state = ckpt_io.restore_training(existing, module, optimizer, cfg, info)
        step, tokens_seen, skipped = state["step"], state["tokens_seen"], state["skipped_steps"]
        loader.load_state_dict(state["loader"])
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    dist_.barrier(info)
    logger = MetricLogger(run_dir, tensorboard=tc.tensorboard, wandb=tc.wandb, wandb_project=tc.wandb_project,
                          config=cfg.to_dict()) if info.is_main else None
    compiled = torch.compile(module) if tc.compile else module
    amp = autocast_context(device, tc.dtype)
    byte_lengths = tokenizer.token_byte_lengths()
    tokens_per_step = tc.batch_size * seq_len * tc.grad_accum * info.world_size
    flops_per_token = method.train_flops_per_token(seq_len)
    peak = tc.peak_flops or device_peak_flops(device)
    params = [p for p in module.parameters() if p.requires_grad]
    ckpt_extra = {"tokenizer": tokenizer.describe(), "data": str(Path(cfg.data.path).resolve()),
                  "params": method.model.num_params()}

    def evaluate() -> dict[str, float]:
        with amp:
            r = evaluate_tokens(compiled, val_split, seq_len=seq_len, batch_size=tc.batch_size,
                                byte_lengths=byte_lengths, max_tokens=tc.eval_batches * tc.batch_size * seq_len)
        extra = {f"val_{k}": v for k, v in r.items() if k not in ("loss", "ppl", "bpb", "tokens", "bytes")}
        return {"val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"], **extra}

    def save(at: int) -> None:
        state = {"step": at, "tokens_seen": tokens_seen, "skipped_steps": skipped,
                 "loader": loader.state_dict(), "world_size": info.world_size}
        ckpt_io.save_checkpoint(run_dir, at, module, optimizer, cfg, state, info, ckpt_extra)

    if info.is_main:
        n = method.model.num_params()
        print(f"latentlm train: method={tc.method} params={n / 1e6:.2f}M device={device} "
              f"world={info.world_size} tokens/step={tokens_per_step} steps={step}->{tc.max_steps}", flush=True)
    end = tc.max_steps if stop_after is None else min(tc.max_steps, stop_after)
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (tc.progress and info.is_main), unit="step",
               dynamic_ncols=True)
    module.train()
    last: dict[str, Any] = {}
    t_log, tok_log = time.perf_counter(), tokens_seen
    while step < end:
        lr = lr_at(step, tc)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            extra = method.batch_inputs(x, y, loader.last_windows)
            sync = micro == tc.grad_accum - 1
            ctx = module.no_sync() if (info.mode == "ddp" and not sync) else contextlib.nullcontext()
            with ctx:
                with amp:
                    loss, metrics = compiled(x, y, **extra)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        stats = dist_.all_reduce_mean(torch.stack([loss_sum / tc.grad_accum, grad_norm.float()]), info)
        loss_val, norm_val = stats.tolist()  # the one host sync per optimizer step
        tokens_seen += tokens_per_step
        step += 1
        if math.isfinite(loss_val) and math.isfinite(norm_val):
            optimizer.step()
            bad_in_row = 0
        else:
            bad_in_row += 1
            skipped += 1
            if logger:
                logger.log({"step": step, "skipped": True, "loss": loss_val, "grad_norm": norm_val})
            if info.is_main:
                tqdm.write(f"step {step}: non-finite loss or gradient ({loss_val}, {norm_val}); update skipped")
        optimizer.zero_grad(set_to_none=True)
        if bad_in_row >= tc.max_bad_steps:
            raise NonFiniteLossError(f"{bad_in_row} optimizer steps in a row had a non-finite loss or gradient "
                                     f"(step {step}); lower --train.lr or check the data. The last good "
                                     f"checkpoint is {ckpt_io.latest_checkpoint(run_dir)}")
        bar.update(1)
        if step % tc.log_every == 0 or step == end:
            now = time.perf_counter()
            tok_s = (tokens_seen - tok_log) / max(now - t_log, 1e-9)
            t_log, tok_log = now, tokens_seen
            last = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": norm_val, "tokens": tokens_seen,
                    "tok_per_s": tok_s, "flops_per_token": flops_per_token}
            last.update({k: float(v) for k, v in metrics.items()})
            if peak:
                last["mfu"] = flops_per_token * tok_s / (peak * info.world_size)
            if logger:
                logger.log(last)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}")
        t_pause = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            ev = evaluate()
            if logger:
                logger.log({"step": step, "tokens": tokens_seen, **ev})
            if info.is_main:
                tqdm.write(f"step {step}: val_loss {ev['val_loss']:.4f} ppl {ev['val_ppl']:.2f} "
                           f"bpb {ev['val_bpb']:.4f}")
        # No checkpoint inside a non-finite streak: the latest one stays from before it.
        if ((tc.ckpt_every and step % tc.ckpt_every == 0) or step == end) and bad_in_row == 0:
            save(step)
        t_log += time.perf_counter() - t_pause
    bar.close()
    result = dict(last)
    if step >= tc.max_steps:
        ev = evaluate()
        result.update(ev)
        if logger:
            logger.log({"step": step, "tokens": tokens_seen, "final": True, **ev})
        if info.is_main:
            (run_dir / "final.json").write_text(json.dumps(result, indent=2))
            print(f"done: val_loss {ev['val_loss']:.4f} ppl {ev['val_ppl']:.2f} bpb {ev['val_bpb']:.4f} "
                  f"({tokens_seen:,} tokens)", flush=True)
    if logger:
        logger.close()
    result["step"] = step
    return result
