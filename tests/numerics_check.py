"""Run by tests/test_numerics.py under torchrun: the real Trainer, fed identical global batches
whatever the layout.

    numerics_check.py CONFIG RUN_DIR:SET1,SET2,... [RUN_DIR:...]

Each run trains from scratch (`--resume none`) with the test's loader swapped in for the
trainer's: micro batch j of step s (j = accumulation step x ranks + rank, the global index the
trainer seeds each micro batch's noise with) is the same tensors on any layout, so 2 ranks x 1
accumulation step and 1 rank x 2 see the same global batches and the same noise. Everything
else (the engine, ZeRO's partitioning, gradient averaging over ranks or accumulation, the
optimizer, the LR schedule) is the production path. The losses are in each run's metrics.jsonl.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.training.trainer import Trainer  # noqa: E402
from imagen_train.utils import dist  # noqa: E402


class SameGlobalBatches:
    """Micro batch j of step s: random images and text embeddings seeded by (s, j) alone."""

    def __init__(self, cfg, accum: int):
        self.cfg, self.accum, self.calls = cfg, accum, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        step, micro = divmod(self.calls, self.accum)
        self.calls += 1
        j = micro * dist.world_size() + dist.rank()
        gen = torch.Generator().manual_seed(1000 * step + j)
        b, res, length = self.cfg.training.micro_batch_size, self.cfg.train_resolution, self.cfg.text.max_length
        mask = torch.arange(length) < torch.randint(1, length + 1, (b, 1), generator=gen)   # (B, L)
        emb = torch.randn(b, length, self.cfg.text.embed_dim, generator=gen) * mask[..., None]
        return {"image": torch.rand(b, 3, res, res, generator=gen) * 2 - 1, "text_emb": emb, "text_mask": mask,
                "caption": [""] * b, "key": [f"{step}:{j}:{i}" for i in range(b)]}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def close(self) -> None:
        """Nothing to stop: no worker processes (the trainer closes its loader when the loop ends)."""


def main() -> None:
    config = sys.argv[1]
    for job in sys.argv[2:]:
        run_dir, sets = job.split(":", 1)
        cfg = load_config(config, [f"run_dir={run_dir}"] + sets.split(","))
        trainer = Trainer(cfg, resume="none")
        trainer.loader.close()
        trainer.loader = SameGlobalBatches(cfg, trainer.accum)
        trainer.run()


if __name__ == "__main__":
    main()
    from imagen_train.utils.dist import exit_process
    exit_process(0)  # as launch/train.py: no interpreter teardown under live gloo threads
