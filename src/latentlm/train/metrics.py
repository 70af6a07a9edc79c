"""Metric sinks: a JSONL file always, TensorBoard and Weights & Biases when asked for."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError
from latentlm.fileio import write_text_atomic


class MetricLogger:
    """Writes one JSON object per record to ``metrics.jsonl``; mirrors numbers to TB / W&B.

    W&B honours ``WANDB_MODE=offline`` (no network needed). ``after_step`` is the step the run
    starts from: records of later steps, left by a run that was killed after its last checkpoint,
    are dropped (the resumed run logs them again), and so are a line a crash cut short and the
    final evaluation (logged again when the run ends)."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "latentlm", config: dict | None = None, after_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        _truncate_after(self.path, after_step)
        self.file = open(self.path, "a")
        self.tb = self.run = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LatentLMError("train.tensorboard=true needs tensorboard: pip install 'latentlm[tensorboard]'") from None
            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise LatentLMError("train.wandb=true needs wandb: pip install 'latentlm[wandb]' "
                                    "(set WANDB_MODE=offline to run without network)") from None
            self.run = wb.init(project=wandb_project, dir=str(out_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
        except OSError as e:  # e.g. a full disk: the checkpoints written so far stay usable
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
