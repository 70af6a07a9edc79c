"""Metric sinks: a JSONL file always, TensorBoard and Weights & Biases when asked for."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError
from latentlm.fileio import write_json_atomic, write_text_atomic

WANDB_RUN_FILE = "wandb_run.json"  # in the run directory: the W&B run id a resumed run continues


def _sink_module(name: str) -> Any:
    """The optional package behind a sink (TensorBoard's ``SummaryWriter``, ``wandb``), or one line
    saying how to install it."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError:
        raise LatentLMError(f"train.{name}=true needs {name}: pip install 'latentlm[{name}]'"
                            + (" (set WANDB_MODE=offline to run without network)" if name == "wandb" else "")) from None


def check_sinks(*, tensorboard: bool, wandb: bool) -> None:
    """Fail with one line when a requested sink's package is missing; the trainer asks before it
    writes anything, so a missing package leaves no half-made run directory."""
    for name, wanted in (("tensorboard", tensorboard), ("wandb", wandb)):
        if wanted:
            _sink_module(name)


def _wandb_init(wb: Any, out_dir: Path, resume: bool, **kwargs: Any) -> Any:
    """``wandb.init(**kwargs)``; a resumed run continues the W&B run recorded in ``RUN/wandb_run.json``
    (``id=..., resume="allow"``), a fresh one (or a resume of a run without a record) records its id."""
    path = out_dir / WANDB_RUN_FILE
    recorded = None
    if resume and path.is_file():
        try:
            recorded = str(json.loads(path.read_text(encoding="utf-8"))["id"])
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: continue in a new W&B run
            recorded = None
    run = wb.init(**kwargs, **({"id": recorded, "resume": "allow"} if recorded else {}))
    run_id = getattr(run, "id", None)
    if run_id and run_id != recorded:
        try:
            write_json_atomic(path, {"id": run_id, "project": kwargs.get("project")})
        except OSError as e:
            raise LatentLMError(f"cannot write {path} ({e.strerror}); free disk space, then run the same "
                                "command with --resume") from None
    return run


class MetricLogger:
    """Writes one JSON object per record to ``metrics.jsonl``; mirrors numbers to TB / W&B.

    W&B honours ``WANDB_MODE=offline`` (no network needed); with ``resume`` it continues the W&B
    run this run directory recorded. ``after_step`` is the step the run starts from: records of
    later steps, left by a run that was killed after its last checkpoint, are dropped (the resumed
    run logs them again), and so are a line a crash cut short and the final evaluation (logged
    again when the run ends)."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "latentlm", config: dict | None = None, after_step: int = 0,
                 resume: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        _truncate_after(self.path, after_step)
        self.file = open(self.path, "a")
        self.tb = self.run = None
        if tensorboard:
            self.tb = _sink_module("tensorboard")(str(Path(out_dir) / "tensorboard"))
        if wandb:
            self.run = _wandb_init(_sink_module("wandb"), Path(out_dir), resume, project=wandb_project,
                                   dir=str(out_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
        except OSError as e:  # e.g. a full disk: the checkpoints written so far stay usable
            with contextlib.suppress(OSError):
                self.file.close()  # drops the refused bytes (a later close would retry and fail again)
            raise LatentLMError(f"cannot append to {self.path} ({e.strerror}); free disk space, then run the same "
                                "command with --resume") from None
        step = record.get("step", 0)
        nums = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
        if self.run is not None:
            self.run.log(nums, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.run is not None:
            self.run.finish()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step and not record.get("final"):
            keep.append(line + "\n")
    write_text_atomic(path, "".join(keep))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
