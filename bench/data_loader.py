"""Data-layer throughput: loader samples/s per worker at 64/256/1024 px, and precompute overhead.

    python bench/data_loader.py [--samples 256] [--out /tmp/imagen-bench-data]

1. Loader: synthetic JPEG shards at 64, 256 and 1024 px with random float16 embeddings of width
   1024 (t5-11b's, ~20 tokens); `build_train_loader` with num_workers=0 for the stage that reads
   that size (base64, sr256, sr1024 with its 256 px crops). Samples/s of one worker process.
2. precompute-embeddings on 64 px shards with a random t5-small-sized encoder (d_model 512, 6
   layers) against a bare tokenize + encoder forward over the same captions and batches; the
   difference is the I/O overhead (tar reading, image checks, .npy encoding, writing).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from data_tools.common import write_tar_atomic  # noqa: E402
from data_tools.precompute import precompute_embeddings  # noqa: E402
from data_tools.synthetic import write_synthetic  # noqa: E402
from imagen_train.config import Config, DataConfig, ModelConfig, TextConfig, TrainingConfig  # noqa: E402
from imagen_train.data import build_train_loader  # noqa: E402
from imagen_train.data.schema import encode_embedding  # noqa: E402
from imagen_train.data.shards import iter_raw_samples  # noqa: E402

EMBED_DIM = 1024
STAGE_FOR = {64: "base64", 256: "sr256", 1024: "sr1024"}


def add_fake_embeddings(src: Path, dst: Path) -> str:
    """Copy shards adding random (n, 1024) float16 embeddings; returns a brace pattern."""
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    urls = sorted(src.glob("*.tar"))
    for url in urls:
        samples = []
        for s in iter_raw_samples(str(url)):
            entries = {k: v for k, v in s.items() if not k.startswith("__")}
            emb = rng.standard_normal((int(rng.integers(12, 30)), EMBED_DIM)).astype(np.float16)
            entries.update(encode_embedding(emb, max_length=128, encoder="fake", truncated=False))
            samples.append((s["__key__"], entries))
        write_tar_atomic(dst / url.name, samples)
    return str(dst / f"{{00000..{len(urls) - 1:05d}}}.tar")


def bench_loader(pattern: str, resolution: int, num_batches: int, batch: int) -> dict:
    stage = STAGE_FOR[resolution]
    cfg = Config(stage=stage, model=ModelConfig(kind="unet" if stage == "base64" else "efficient_unet"),
                 text=TextConfig(embed_dim=EMBED_DIM, max_length=128),
                 data=DataConfig(train_shards=pattern, num_workers=0, shuffle_buffer=64),
                 training=TrainingConfig(micro_batch_size=batch, global_batch_size=batch))
    loader = build_train_loader(cfg, 0, 1)
    next(loader)  # warm-up: first shard open, imports
    t0 = time.perf_counter()
    for _ in range(num_batches):
        out = next(loader)
    dt = time.perf_counter() - t0
    return {"resolution": resolution, "stage": stage, "batch_shape": list(out["image"].shape),
            "samples": num_batches * batch, "seconds": round(dt, 2),
            "samples_per_s_per_worker": round(num_batches * batch / dt, 1)}


def bench_precompute(raw: Path, work: Path, batch_size: int) -> dict:
    from conftest import build_tiny_t5
    from imagen_train.text import load_text_encoder

    t5 = build_tiny_t5(work / "t5-small-random", d_model=512, num_layers=6)
    pattern = str(raw / ("{00000..%05d}.tar" % (len(list(raw.glob("*.tar"))) - 1)))
    summary = precompute_embeddings(pattern, str(t5), work / "emb", batch_size=batch_size, progress_bar=False)
    pipeline_s = summary["seconds"] - summary["load_seconds"]
    # Bare encoder: the same captions in the same batches, tokenize + forward only.
    enc = load_text_encoder(t5, "cpu", torch.float32)
    captions = [s["txt"].decode() for p in sorted(raw.glob("*.tar")) for s in iter_raw_samples(str(p))]
    t0 = time.perf_counter()
    for shard_start in range(0, len(captions), 256):  # the synthetic shard size below
        shard = captions[shard_start:shard_start + 256]
        for i in range(0, len(shard), batch_size):
            enc.encode_tokens(enc.tokenize(shard[i:i + batch_size], 128))
    bare_s = time.perf_counter() - t0
    n = summary["samples_written"]
    return {"encoder": "random T5, d_model 512, 6 layers, 8 heads (t5-small size)", "device": "cpu",
            "dtype": "fp32", "batch_size": batch_size, "samples": n,
            "precompute_samples_per_s": round(n / pipeline_s, 1), "bare_encoder_samples_per_s": round(n / bare_s, 1),
            "io_overhead_pct": round(100 * (pipeline_s - bare_s) / pipeline_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="samples per resolution (1024 px: a quarter)")
    parser.add_argument("--out", default="/tmp/imagen-bench-data", help="scratch folder (deleted first)")
    parser.add_argument("--batch-size", type=int, default=64, help="precompute batch size")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    results = {"torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "loader": []}
    for res in (64, 256, 1024):
        n = args.samples if res < 1024 else max(16, args.samples // 4)
        write_synthetic(work / f"raw{res}", n, res, shard_size=256, image_format="jpg", progress_bar=False)
        pattern = add_fake_embeddings(work / f"raw{res}", work / f"emb{res}")
        batch = 16 if res < 1024 else 4
        results["loader"].append(bench_loader(pattern, res, max(2, n // batch - 2), batch))
    results["precompute"] = bench_precompute(work / "raw64", work, args.batch_size)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
