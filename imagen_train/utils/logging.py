"""Metrics to Weights & Biases (rank 0 only) and plain log lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from imagen_train.config import LoggingConfig
from imagen_train.utils import dist


class MetricLogger:
    """W&B run plus a JSON-lines file of every logged step, both on rank 0 only.

    The W&B run id is kept by the trainer in its checkpoints, so a resumed job continues the
    same run. `wandb_mode: disabled` keeps the JSON-lines file only.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict[str, Any],
                 run_id: str | None = None):
        self.cfg = cfg
        self.run = None
        self.run_id = run_id
        self.jsonl = None
        if not dist.is_main():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.wandb_mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                              name=cfg.run_name, mode=cfg.wandb_mode, config=config,
                              id=run_id, resume="allow" if run_id else None, dir=str(run_dir))
        self.run_id = self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.run is not None:
            self.run.finish()
            self.run = None
