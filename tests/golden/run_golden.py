"""The golden-loss recipe: 50 steps of the tiny base64 preset through the real Trainer, 1 rank.

    python tests/golden/run_golden.py --out losses.json   # run it, write the per-step losses
    python tests/golden/run_golden.py --record            # re-record tests/golden/base64-tiny-losses.json

Re-record only for a deliberate numerical change, and say in the commit what changed and why.
Everything is fixed: 64 synthetic shape images (data_tools.synthetic.draw_sample, seed 0) with
random float16 "text embeddings" drawn from a seeded NumPy generator (no text encoder, so the
recipe does not depend on transformers or a tokenizer), data.seed, training.seed, fp32, one
process and one thread, no loader worker processes. The loss of each step is taken where the trainer computes
it (`diffusion.training_loss(...).mean()`), not from the log, so a change to how or how often
the trainer logs does not matter here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GOLDEN = HERE / "base64-tiny-losses.json"
STEPS = 50
NUM_SAMPLES, SHARD_SIZE, EMBED_DIM = 64, 32, 64


def write_shards(folder: Path) -> str:
    """Two shards of 32 fixed samples (64 px PNG, caption, (n, 64) float16 embedding)."""
    import numpy as np

    from data_tools.common import write_tar_atomic
    from data_tools.synthetic import draw_sample
    from imagen_train.data.schema import encode_embedding

    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(NUM_SAMPLES // SHARD_SIZE):
        samples = []
        for i in range(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE):
            img, caption, _ = draw_sample(0, i, 64)
            png = io.BytesIO()
            img.save(png, format="PNG")
            rng = np.random.default_rng([7, i])
            emb = rng.standard_normal((len(caption.split()) + 1, EMBED_DIM)).astype(np.float16)
            entries = {"png": png.getvalue(), "txt": caption.encode()}
            entries.update(encode_embedding(emb, max_length=16, encoder="golden-random", truncated=False))
            samples.append((f"{i:06d}", entries))
        write_tar_atomic(folder / f"{shard:05d}.tar", samples)
    return str(folder / "{00000..00001}.tar")


def overrides(run_dir: Path, shards: str) -> list[str]:
    """The recipe's settings over configs/base64-tiny.yaml (the model is the preset's)."""
    sets = {
        "run_dir": run_dir, "data.train_shards": shards, "data.num_workers": 0, "data.shuffle_buffer": 16,
        "data.seed": 0, "text.embed_dim": EMBED_DIM, "text.max_length": 16, "training.seed": 0,
        "training.precision": "fp32", "training.zero_stage": 2, "training.micro_batch_size": 8,
        "training.global_batch_size": 8, "training.max_steps": STEPS, "training.log_every_steps": 10,
        "optim.lr": 1e-3, "lr_schedule.warmup_steps": 0, "checkpoint.every_steps": 10 * STEPS,
        "logging.wandb_mode": "disabled", "logging.progress_bar": False,
    }
    return [f"{k}={v}" for k, v in sets.items()]


class RecordingDiffusion:
    """Passes every call to the trainer's diffusion object, noting each training loss."""

    def __init__(self, inner):
        self._inner = inner
        self.losses: list[float] = []

    def training_loss(self, *args, **kwargs):
        loss = self._inner.training_loss(*args, **kwargs)
        self.losses.append(float(loss.detach().mean()))
        return loss

    def __getattr__(self, name):
        return getattr(self._inner, name)


def run(work: Path) -> list[float]:
    """Train the recipe in this process (rank 0 of 1) and return the loss of every step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from imagen_train.config import load_config
    from imagen_train.training.trainer import Trainer
    from imagen_train.utils.dist import shutdown

    torch.set_num_threads(1)  # the thread count changes float sums (1e-7 relative, growing to ~5e-4 by step 50)
    cfg = load_config(REPO / "configs" / "base64-tiny.yaml", overrides(work / "run", write_shards(work / "shards")))
    trainer = Trainer(cfg, resume="none")
    trainer.diffusion = recorder = RecordingDiffusion(trainer.diffusion)
    result = trainer.run()
    shutdown()
    if result.step != STEPS or len(recorder.losses) != STEPS:
        raise RuntimeError(f"expected {STEPS} steps of one micro batch, got {result.step} steps and "
                           f"{len(recorder.losses)} losses (a skipped non-finite step?)")
    return recorder.losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write {'losses': [...]} here")
    parser.add_argument("--record", action="store_true", help=f"overwrite {GOLDEN.relative_to(REPO)}")
    args = parser.parse_args()
    import torch
    with tempfile.TemporaryDirectory(prefix="imagen-golden-") as tmp:
        losses = run(Path(tmp))
    doc = {"recipe": "tests/golden/run_golden.py: configs/base64-tiny.yaml, 50 steps, batch 8, fp32, 1 rank",
           "torch": torch.__version__, "machine": platform.machine(), "losses": losses}
    for path in ([args.out] if args.out else []) + ([GOLDEN] if args.record else []):
        path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(losses))
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(REPO)]
    code = main()
    from imagen_train.utils.dist import exit_process
    exit_process(code)  # as launch/train.py: no interpreter teardown under live gloo threads
