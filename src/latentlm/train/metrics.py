"""Metric sinks: a JSONL file always, TensorBoard and Weights & Biases when asked for."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError


class MetricLogger:
    """Writes one JSON object per record to ``metrics.jsonl``; mirrors numbers to TB / W&B.

    W&B honours ``WANDB_MODE=offline`` (no network needed)."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "latentlm", config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
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
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
