"""Metrics to Weights & Biases (rank 0 only) and plain log lines."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Optional

from imagen_train.config import LoggingConfig
from imagen_train.utils import dist

LOGGED = "logged.json"  # in run_dir: the W&B run id and the last step (and its keys) logged


class MetricLogger:
    """W&B run plus a JSON-lines file of every logged step, both on rank 0 only.

    A restarted job logs into the same W&B run, and every point appears once in each sink:

    - The run id is kept in the checkpoints by the trainer, and also in `run_dir/logged.json`
      from the moment the run is created, so a job killed before its first checkpoint continues
      the same run when restarted (`fresh=False`). `fresh=True` (`--resume none`: training
      starts over) opens a new run.
    - `metrics.jsonl` is the record: each line is flushed when logged, and `logged.json` holds
      the last step written and its keys. A resumed job replays the steps between its
      checkpoint and the kill; points already written are not logged again (resumption being
      exact, they hold the same values). At the last written step only new keys pass (an
      evaluation logged before the kill, the training metrics of that step after it).
    - W&B may hold less than the file: a killed W&B process loses what it had not written
      (wandb 0.31 offline: everything since its last flush, often the whole job). So at start
      the rows of this run that W&B lacks, the steps after the last one it holds, are sent to
      it from `metrics.jsonl`. What W&B holds: online, the resumed run's `starting_step`;
      offline, the steps in this run's earlier `wandb/offline-run-*-<id>/run-<id>.wandb`
      files (`wandb_logged_steps`). Images are not in the file and are not re-sent.

    `wandb_mode: disabled` keeps the JSON-lines file (and the same filter) only.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict[str, Any],
                 run_id: str | None = None, fresh: bool = False):
        self.cfg = cfg
        self.run = None
        self.run_id = run_id
        self.jsonl = None
        self.state_path = Path(run_dir) / LOGGED
        self.last_step, self.last_keys = 0, set()  # already in metrics.jsonl for this run
        self.jsonl_start = 0  # byte offset of this run's first line in metrics.jsonl
        if not dist.is_main():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path = run_dir / "metrics.jsonl"
        saved = None if fresh else _read_state(self.state_path)  # fresh: training starts over
        if run_id is None and saved is not None:
            self.run_id = saved.get("wandb_id")  # killed before its first checkpoint
        if saved is not None and saved.get("wandb_id") == self.run_id:
            self.last_step, self.last_keys = int(saved.get("step", 0)), set(saved.get("keys", []))
            self.jsonl_start = int(saved.get("jsonl_start", 0))
        else:
            self.jsonl_start = jsonl_path.stat().st_size if jsonl_path.is_file() else 0
        self.jsonl = open(jsonl_path, "a")
        if cfg.wandb_mode != "disabled":
            import wandb  # optional at import time: only runs that log to W&B need it

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                                  name=cfg.run_name, mode=cfg.wandb_mode, config=config,
                                  id=self.run_id, resume="allow" if self.run_id else None, dir=str(run_dir))
            self.run_id = self.run.id
            # WANDB_SILENT (set above, to keep wandb's banner out of every log) also hides its
            # line with the run's address: say where the run is ourselves.
            dist.print0(describe_wandb_run(self.run, cfg.wandb_mode))
            held = self.run.starting_step - 1 if cfg.wandb_mode == "online" else \
                max(wandb_logged_steps(run_dir, self.run_id, before=self.run.dir), default=-1)
            for row in _rows(jsonl_path, self.jsonl_start):
                step = row.pop("step")
                row.pop("time", None)
                if step > held:
                    self.run.log(row, step=step)
        self._save_state()

    def _save_state(self) -> None:
        """Write logged.json atomically (a kill mid-write leaves the previous one)."""
        tmp = self.state_path.with_name(f"{LOGGED}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"wandb_id": self.run_id, "step": self.last_step,
                                   "keys": sorted(self.last_keys), "jsonl_start": self.jsonl_start}))
        os.replace(tmp, self.state_path)

    def _new_points(self, metrics: dict[str, Any], step: int) -> dict[str, Any]:
        """The part of `metrics` at `step` not logged to this run before; notes it as logged."""
        if step < self.last_step:
            return {}
        if step == self.last_step:
            metrics = {k: v for k, v in metrics.items() if k not in self.last_keys}
            self.last_keys |= set(metrics)
        else:
            self.last_step, self.last_keys = step, set(metrics)
        return metrics

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.jsonl is None:
            return
        metrics = self._new_points(metrics, step)
        if not metrics:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()
        self._save_state()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """An image to W&B only (not in metrics.jsonl), at most once per key and step."""
        if self.run is None or not self._new_points({key: None}, step):
            return
        import wandb  # optional at import time: only runs that log to W&B get here
        self._save_state()
        self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def describe_wandb_run(run: Any, mode: str) -> str:
    """One line saying where a W&B run is: its URL online, its folder and the upload command offline."""
    if mode == "online":
        return f"[wandb] run {run.id} of {run.entity}/{run.project}: {run.url}"
    folder = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run's folder
    return f"[wandb] offline run {run.id} in {folder}; upload it with: wandb sync {folder}"


def _rows(path: Path, start: int) -> list[dict[str, Any]]:
    """The complete JSON lines of `path` from byte `start` on (a line cut by a kill is left out)."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read().split(b"\n")
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


def _read_state(path: Path) -> Optional[dict[str, Any]]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: start a new run
    return state if isinstance(state, dict) else None


def wandb_logged_steps(run_dir: Path, run_id: str, before: Optional[str] = None) -> list[int]:
    """History steps that earlier offline runs of `run_id` under `run_dir/wandb` hold.

    Reads each `run-<id>.wandb` transaction log (what `wandb sync` uploads): a 7-byte header
    (`:W&B`, magic, version), then LevelDB-log records (32 KiB blocks, each piece with a 7-byte
    header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) holding wandb's protobuf `Record`s.
    `before` (this job's own run folder) is left out. A file in another format is skipped.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # only runs that log to W&B get here

    steps: list[int] = []
    for path in sorted(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        if before is not None and path.parent.resolve() == Path(before).resolve().parent:
            continue
        data = path.read_bytes()
        if data[:4] != b":W&B":
            continue
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 or pos + 7 + length > len(data):  # padding, or a tail cut by the kill
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                try:
                    record.ParseFromString(pending)
                except Exception:  # noqa: BLE001 - a torn record: ignore it
                    continue
                if record.WhichOneof("record_type") == "history":
                    steps.append(int(record.history.step.num))
    return steps
