"""The one training loop. It knows nothing about methods beyond the ``Method`` seam:
``loss, metrics = method(x, y)`` and ``method.train_flops_per_token(seq_len)``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from latentlm.config import Config, config_differences, config_summary, derive_vocab_size, save_yaml
from latentlm.data.loader import TokenSplit, WindowLoader
from latentlm.data.prepare import check_tokenizer, load_manifest, tokenizer_for
from latentlm.errors import Interrupted, LatentLMError
from latentlm.eval.perplexity import evaluate_tokens
from latentlm.fileio import dir_lock, sha256_file, write_errors, write_json_atomic
from latentlm.loading import load_config
from latentlm.methods import build_method
from latentlm.model.flops import device_peak_flops
from latentlm.train import checkpoint as ckpt_io
from latentlm.train import distributed as dist_
from latentlm.train.metrics import MetricLogger, check_sinks
from latentlm.train.optim import build_optimizer, lr_at
from latentlm.train.warmstart import init_core_from


class NonFiniteLossError(LatentLMError):
    pass


# Settings a resumed run may change: how it reports, saves, where it runs; never what it computes.
SAFE_ON_RESUME = ("train.out_dir", "train.progress", "train.log_every", "train.eval_every", "train.eval_batches",
                  "train.ckpt_every", "train.keep_last", "train.tensorboard", "train.wandb", "train.wandb_project",
                  "train.device", "train.compile", "train.dist", "train.max_bad_steps", "train.peak_flops",
                  "train.init_from", "data.verify", "train.fused_loss")


def _same_data(old: str, new: str) -> bool:
    """Whether ``data.path`` moved without changing the data: the old directory is gone or holds the
    same manifest (shards are checked against the manifest when the run starts)."""
    old_manifest, new_manifest = Path(old) / "manifest.json", Path(new) / "manifest.json"
    if not new_manifest.is_file():
        return False
    return not old_manifest.is_file() or sha256_file(old_manifest) == sha256_file(new_manifest)


def check_resume_config(saved: Config, cfg: Config, ckpt: Path) -> list[str]:
    """The safe changes (``"key old -> new"``) of a resumed run's config against the one its checkpoint
    ``ckpt`` saved; any other difference is refused by name, since the run would no longer be the
    one that was started (a new shape, schedule, seed or objective)."""
    if saved.train.method != cfg.train.method:
        raise LatentLMError(f"checkpoint {ckpt} was trained with method {saved.train.method!r}, not "
                            f"{cfg.train.method!r}; resume with --train.method {saved.train.method}")
    changes = []
    for key, old, new in config_differences(saved, cfg):
        if key not in SAFE_ON_RESUME and not (key == "data.path" and _same_data(old, new)):
            raise LatentLMError(f"cannot resume from {ckpt}: {key} was {old!r}, now {new!r}; resume with the saved "
                                f"value or start a new run (resumable changes: {', '.join(SAFE_ON_RESUME)}, and "
                                "data.path to a copy of the same data)")
        changes.append(f"{key} {old!r} -> {new!r}")
    return changes


def _device_scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A method metric (a tensor or a number) as a float32 scalar on ``device``, without a host sync."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.full((), float(value), device=device)


def _last_good(run_dir: Path, then: str = "") -> str:
    """Where a run stopped inside a non-finite streak goes on from (a streak's steps are never saved),
    with ``then`` (what to do with that checkpoint) when there is one."""
    ck = ckpt_io.latest_checkpoint(run_dir)
    if ck is None:
        return "No checkpoint was saved before it: run the same command again without --resume to start over"
    return f"The last good checkpoint is {ck}{then}"


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default (``auto``); plain float32 on CPU unless asked."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: Config, *, resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg.train.method`` on ``cfg.data.path``; return the final metrics.

    ``resume`` continues from the run directory's latest checkpoint; on a run that is already complete
    (its last checkpoint at ``max_steps`` and its ``final.json`` written) it says so and returns that
    summary without touching a file. ``stop_after`` ends the run (with a checkpoint) after that many
    optimizer steps without changing the schedule, which is how an interrupted run is simulated in
    tests. ``quiet`` drops the start block, the progress bar and the periodic validation lines
    (warnings, errors and the final line still print).
    """
    tc = cfg.train
    info, device = dist_.setup(tc.dist, tc.device)
    try:
        # A missing TensorBoard / W&B package fails here, before anything is written.
        dist_.on_rank0(lambda: check_sinks(tensorboard=tc.tensorboard, wandb=tc.wandb), info)
        with _run_lock(Path(tc.out_dir), info), _StopRequest() as stop:
            result = _train(cfg, info, device, resume, stop_after, stop, quiet)
        dist_.barrier(info)  # no rank tears its process group down while another still works with it
        return result
    finally:
        dist_.teardown(info)


@contextlib.contextmanager
def _run_lock(run_dir: Path, info: dist_.DistInfo) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the whole run, so a second ``train`` on the same
    directory fails at once instead of interleaving checkpoints; every rank fails with it."""
    with contextlib.ExitStack() as stack:
        dist_.on_rank0(lambda: stack.enter_context(dir_lock(run_dir, "choose another --train.out_dir")), info)
        yield


class _StopRequest:
    """SIGINT / SIGTERM during training: the first one asks for a checkpoint and an orderly stop
    after the current step (preemption); a second one acts as it would without this handler."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()
        os.write(2, f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step "
                    "(send it again to stop at once)\n".encode())

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _complete_summary(run_dir: Path, ckpt: Path, max_steps: int) -> dict[str, Any] | None:
    """The ``final.json`` of a run whose latest checkpoint ``ckpt`` is its last step, or None when the run
    is not complete (a run killed between its final checkpoint and ``final.json`` is finished by a
    resume, which evaluates it and writes the file)."""
    if ckpt_io.step_of(ckpt) < max_steps:
        return None
    try:
        final = json.loads((run_dir / "final.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return final if isinstance(final, dict) else None


def _train(cfg: Config, info: dist_.DistInfo, device: torch.device, resume: bool,
           stop_after: int | None, stop: _StopRequest, quiet: bool = False) -> dict[str, Any]:
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    talk = info.is_main and not quiet
    data_manifest = load_manifest(cfg.data.path, verify=cfg.data.verify)
    derive_vocab_size(cfg, data_manifest)  # a vocabulary the config leaves to the data: this data's
    tokenizer = tokenizer_for(data_manifest, cfg.data.path)
    check_tokenizer(data_manifest, tokenizer, vocab_size=cfg.model.vocab_size)
    seq_len = cfg.seq_len
    loader = WindowLoader(TokenSplit(cfg.data.path, "train"), seq_len, tc.batch_size, seed=tc.seed,
                          rank=info.rank, world_size=info.world_size, pin_memory=device.type == "cuda",
                          shift=cfg.data.shift_windows)
    val_split = TokenSplit(cfg.data.path, "val")

    existing = ckpt_io.latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise LatentLMError(f"{run_dir} already holds checkpoints; pass --resume to continue it "
                            "or choose another --train.out_dir")
    if resume and existing is None:
        raise LatentLMError(f"--resume given but {run_dir} holds no checkpoint to resume from")

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    method = build_method(cfg).to(device)  # resolves the settings the method derives (e.g. from its SAE)
    changes = check_resume_config(load_config(existing), cfg, existing) if existing is not None else []
    final = _complete_summary(run_dir, existing, tc.max_steps) if existing is not None else None
    if final is not None:  # nothing to train, evaluate or write: the run's files stay as they are
        step = ckpt_io.step_of(existing)
        if info.is_main:
            print(f"run {run_dir} is complete (step {step} of {tc.max_steps}); nothing to do", flush=True)
        return {**final, "step": step}
    method.validate_inputs(device)  # teacher / SAE / label cache / tokenizer mismatches fail before any output
    if tc.init_from and existing is None:  # before wrapping, so DDP/FSDP start from these weights
        init_core_from(method.model, tc.init_from, data_manifest)
    module = dist_.wrap(method, info, device)
    optimizer = build_optimizer(module, tc, device, fused=None if info.mode != "fsdp2" else False)
    torch.manual_seed(tc.seed + info.rank)  # per-rank dropout streams

    step, tokens_seen, bad_in_row, skipped = 0, 0, 0, 0
    if existing is not None:
        state = ckpt_io.restore_training(existing, module, optimizer, cfg, info)
        step, tokens_seen, skipped = state["step"], state["tokens_seen"], state["skipped_steps"]
        loader.load_state_dict(state["loader"])
    failure, logger = None, None
    if info.is_main:  # a full or read-only disk here is one line on every rank, like a failed checkpoint
        hint = "free disk space or make it writable, then run the same command" + (" (it resumes)" if existing else "")
        try:
            with write_errors(run_dir, hint, errnos=None):
                run_dir.mkdir(parents=True, exist_ok=True)
                save_yaml(cfg, run_dir / "config.yaml")
                logger = MetricLogger(run_dir, tensorboard=tc.tensorboard, wandb=tc.wandb,
                                      wandb_project=tc.wandb_project, config=cfg.to_dict(), after_step=step,
                                      resume=existing is not None)
        except LatentLMError as e:
            failure = str(e)
    dist_.raise_rank0_failure(failure, info)  # instead of a barrier: every rank learns whether rank 0 could write
    compiled = torch.compile(module) if tc.compile else module
    amp = autocast_context(device, tc.dtype)
    byte_lengths = tokenizer.token_byte_lengths()
    tokens_per_step = tc.batch_size * seq_len * tc.grad_accum * info.world_size
    # Counts the teacher too (KD logits, CoCoMix labels): fair comparisons and MFU need all the work.
    flops_per_token = method.train_flops_per_token(seq_len)
    try:
        flops_per_token += method.teacher_flops_per_token(seq_len)
    except LatentLMError as e:  # an unusual teacher shape: train anyway, say what the numbers miss
        if info.is_main:
            print(f"warning: teacher FLOPs not counted in flops_per_token / MFU: {e}", flush=True)
    peak = tc.peak_flops or device_peak_flops(device)
    params = [p for p in module.parameters() if p.requires_grad]
    ckpt_extra = {"tokenizer": tokenizer.describe(), "data": str(Path(cfg.data.path).resolve()),
                  "params": method.model.num_params(), "capabilities": method.capabilities()}

    def evaluate() -> dict[str, float]:
        """``eval_batches`` global batches of held-out windows, each rank scoring its share: the same
        tokens and numbers whatever the world size (for the same global batch)."""
        with amp:
            r = evaluate_tokens(compiled, val_split, seq_len=seq_len, batch_size=tc.batch_size,
                                byte_lengths=byte_lengths, rank=info.rank, world_size=info.world_size,
                                max_tokens=tc.eval_batches * tc.batch_size * info.world_size * seq_len)
        extra = {f"val_{k}": v for k, v in r.items() if k not in ("loss", "ppl", "bpb", "tokens", "bytes")}
        return {"val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"], **extra}

    def save(at: int) -> None:
        state = {"step": at, "tokens_seen": tokens_seen, "skipped_steps": skipped,
                 "loader": loader.state_dict(), "world_size": info.world_size}
        ckpt_io.save_checkpoint(run_dir, at, module, optimizer, cfg, state, info, ckpt_extra)

    if talk:  # one block: where the run lives, where it resumes from, what it runs
        where = (f"resuming {run_dir} from {existing} (step {step} of {tc.max_steps})"
                 + (f"; changed: {', '.join(changes)}" if changes else "")) if existing is not None else \
            f"run {run_dir} (new; config in {run_dir / 'config.yaml'}, metrics in {run_dir / 'metrics.jsonl'})"
        n = method.model.num_params()
        print(f"latentlm train: {where}\n"
              f"  method={tc.method} params={n / 1e6:.2f}M device={device} world={info.world_size} "
              f"tokens/step={tokens_per_step} steps={step}->{tc.max_steps}\n"
              f"  settings: {config_summary(cfg)}", flush=True)
    end = tc.max_steps if stop_after is None else min(tc.max_steps, stop_after)
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (tc.progress and talk), unit="step",
               dynamic_ncols=True)
    module.train()
    last: dict[str, Any] = {}
    stopping = False
    t_log, tok_log = time.perf_counter(), tokens_seen
    while step < end:
        lr = lr_at(step, tc)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro in range(tc.grad_accum):
            x, y, windows = loader.next_batch_windows()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            extra = method.batch_inputs(x, y, windows=windows, step=step)  # step: optimizer steps done
            sync = micro == tc.grad_accum - 1
            ctx = module.no_sync() if (info.mode == "ddp" and not sync) else contextlib.nullcontext()
            with ctx:
                with amp:
                    loss, metrics = compiled(x, y, **extra)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + _device_scalar(v, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # A stop request and the method's metrics ride the same all-reduce: every rank stops after the
        # same step, and the metrics logged are means over micro-batches and ranks, not rank 0's.
        flag = torch.full((), float(stop.signum), device=device)
        stats = dist_.all_reduce_mean(torch.stack([loss_sum / tc.grad_accum, grad_norm.float(), flag,
                                                   *(m / tc.grad_accum for m in metric_sums.values())]), info)
        loss_val, norm_val, stop_val, *metric_vals = stats.tolist()  # the one host sync per optimizer step
        stopping = stop_val > 0
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
            if logger:
                logger.close()
            raise NonFiniteLossError(f"{bad_in_row} optimizer steps in a row had a non-finite loss or gradient "
                                     f"(step {step}); lower --train.lr or check the data. {_last_good(run_dir)}")
        bar.update(1)
        if step % tc.log_every == 0 or step == end:
            now = time.perf_counter()
            tok_s = (tokens_seen - tok_log) / max(now - t_log, 1e-9)
            t_log, tok_log = now, tokens_seen
            last = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": norm_val, "tokens": tokens_seen,
                    "tok_per_s": tok_s, "flops_per_token": flops_per_token}
            last.update(zip(metric_sums, metric_vals))
            if peak:
                last["mfu"] = flops_per_token * tok_s / (peak * info.world_size)
            if logger:
                logger.log(last)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}")
        t_pause = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps and not stopping:
            ev = evaluate()
            if logger:
                logger.log({"step": step, "tokens": tokens_seen, **ev})
            if talk:
                tqdm.write(f"step {step}: val_loss {ev['val_loss']:.4f} ppl {ev['val_ppl']:.2f} "
                           f"bpb {ev['val_bpb']:.4f}")
        # No checkpoint inside a non-finite streak: the latest one stays from before it.
        if ((tc.ckpt_every and step % tc.ckpt_every == 0) or step == end or stopping) and bad_in_row == 0:
            save(step)
        t_log += time.perf_counter() - t_pause
        if stopping:
            break
    bar.close()
    if logger and ((stopping and step < end) or bad_in_row):
        logger.close()
    if stopping and step < end:
        signum = stop.signum or signal.SIGTERM  # a rank the signal did not reach stops as if SIGTERMed
        if bad_in_row:  # no checkpoint inside the streak: the resume goes back to before it
            raise Interrupted(f"{signal.Signals(signum).name} at step {step}, inside a streak of {bad_in_row} "
                              f"non-finite step(s), which are never saved. "
                              f"{_last_good(run_dir, ': run the same command with --resume to continue from it')}",
                              signum)
        raise Interrupted(f"{signal.Signals(signum).name} at step {step}: saved {ckpt_io.latest_checkpoint(run_dir)}",
                          signum, resume="run the same command with --resume to continue")
    if bad_in_row:
        # Policy: a run never ends on weights it cannot save. Skipped steps leave the weights of the
        # last good step, but no checkpoint is written inside a streak (a resume must not land in it),
        # so the final checkpoint and final.json would describe weights that exist nowhere. Stop instead.
        steps = f"steps {step - bad_in_row + 1}-{step}" if bad_in_row > 1 else f"step {step}"
        raise NonFiniteLossError(f"the run ended inside a streak of {bad_in_row} optimizer step(s) with a non-finite "
                                 f"loss or gradient ({steps}), whose weights are never saved: no final checkpoint "
                                 "and no final.json were written. "
                                 + _last_good(run_dir, ": run the same command with --resume to redo the steps after "
                                              "it (if they fail again, check the data or start a new run with a "
                                              "lower --train.lr)"))
    result = dict(last)
    if step >= tc.max_steps:
        ev = evaluate()
        result.update(ev)
        if logger:
            logger.log({"step": step, "tokens": tokens_seen, "final": True, **ev})
        if info.is_main:
            try:
                write_json_atomic(run_dir / "final.json", result)
            except OSError as e:  # the final checkpoint is already saved: only the summary is missing
                raise LatentLMError(f"cannot write {run_dir / 'final.json'} ({e.strerror}); the final checkpoint "
                                    f"{ckpt_io.latest_checkpoint(run_dir)} is saved, `latentlm eval` it") from None
            print(f"done: val_loss {ev['val_loss']:.4f} ppl {ev['val_ppl']:.2f} bpb {ev['val_bpb']:.4f} "
                  f"({tokens_seen:,} tokens)", flush=True)
    if logger:
        logger.close()
    result["step"] = step
    return result
