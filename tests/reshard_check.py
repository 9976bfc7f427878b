"""Run by tests/test_resume_reshard.py under torchrun: several Trainer runs in one process, each
resuming its run folder (`--resume auto`), so one launch serves several runs.

    reshard_check.py CONFIG RUN_DIR:SET1,SET2,... [RUN_DIR:...]

For each run it saves, on rank 0, the state consolidated to full per-parameter tensors with
DeepSpeed's public API (`reshard_internals_check.consolidated`: fp32 masters, exp_avg,
exp_avg_sq, Adam's step, LR, counters) plus the full EMA (every rank's slice placed at its
bounds and summed over the ranks): `loaded_step{N}.pt` right after the Trainer resumed step N
(before any training), and `saved_step{N}.pt` at its last step N, as it checkpoints it.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.training.trainer import Trainer  # noqa: E402
from imagen_train.utils import dist  # noqa: E402
from reshard_internals_check import consolidated  # noqa: E402


def full_ema(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, entry in trainer.layout.items():
        full = torch.zeros(entry["numel"])
        full[entry["start"]:entry["end"]] = trainer.ema.shadow[name].reshape(-1)
        if dist.world_size() > 1:
            torch.distributed.all_reduce(full)
        out[name] = full.reshape(entry["shape"])
    return out


def dump(trainer: Trainer, path: Path) -> None:
    state = {**consolidated(trainer.engine.deepspeed), "ema": full_ema(trainer), "step": trainer.step}
    if dist.is_main():
        torch.save(state, path)
    dist.barrier()


def main() -> None:
    config = sys.argv[1]
    for job in sys.argv[2:]:
        run_dir, sets = job.split(":", 1)
        cfg = load_config(config, [f"run_dir={run_dir}"] + sets.split(","))
        trainer = Trainer(cfg, resume="auto")
        if trainer.resume_folder is not None:
            dump(trainer, Path(run_dir) / f"loaded_step{trainer.step}.pt")

        def at_end(t: Trainer) -> None:
            if t.step == t.cfg.training.max_steps:
                dump(t, Path(run_dir) / f"saved_step{t.step}.pt")

        trainer.callbacks.append(at_end)
        trainer.run()
        trainer.loader.close()


if __name__ == "__main__":
    main()
    from imagen_train.utils.dist import exit_process
    exit_process(0)  # as launch/train.py: no interpreter teardown under live gloo threads
