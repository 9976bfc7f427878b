"""Data-layer throughput: loader samples/s per worker at 64/256/1024 px, and precompute overhead.

    python bench/data_loader.py [--samples 256] [--out /tmp/imagen-bench-data]

1. Loader: synthetic JPEG shards at 64, 256 and 1024 px with random float16 embeddings of width
   1024 (t5-11b's, ~20 tokens); `build_train_loader` with num_workers=0 for the stage that reads
   that size (base64, sr256, sr1024 with its 256 px crops). Samples/s of one worker process.
2. precompute-embeddings on 64 px shards with a random t5-small-sized encoder (d_model 512, 6
   layers) against a bare tokenize + encoder forward over the same captions and batches; the
   difference is the I/O overhead (tar reading, image checks, .npy encoding, writing).
3. Resume: samples and bytes a loader re-reads to continue after N batches (N = 10 ... 1000,
   shuffle buffer 256, shards of 128, batch 16), and the seconds to its first batch.
Prints one JSON object. `--parts resume` runs only part 3.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.common import write_tar_atomic  # noqa: E402
from data_tools.precompute import precompute_embeddings  # noqa: E402
from data_tools.synthetic import write_synthetic  # noqa: E402
from imagen_train.config import Config, DataConfig, ModelConfig, TextConfig, TrainingConfig  # noqa: E402
from imagen_train.data import build_train_loader  # noqa: E402
from imagen_train.data.schema import encode_embedding  # noqa: E402
from imagen_train.data.shards import iter_raw_samples  # noqa: E402
from imagen_train.stages import STAGES  # noqa: E402

EMBED_DIM = 1024
STAGE_FOR = {spec.output_resolution: name for name, spec in STAGES.items()}


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
    cfg = Config(stage=stage, model=ModelConfig(kind=STAGES[stage].kind),
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


def bench_precompute(raw: Path, work: Path, batch_size: int, repeats: int = 3) -> dict:
    """precompute-embeddings against a bare tokenize + forward on the same captions and batches,
    alternated A/B `repeats` times; medians."""
    from imagen_train.text import load_text_encoder
    from imagen_train.text.tiny import build_tiny_t5

    t5 = build_tiny_t5(work / "t5-small-random", d_model=512, num_layers=6)
    shards = sorted(raw.glob("*.tar"))
    pattern = str(raw / ("{00000..%05d}.tar" % (len(shards) - 1)))
    enc = load_text_encoder(t5, "cpu", torch.float32)
    per_shard = [[s["txt"].decode() for s in iter_raw_samples(str(p))] for p in shards]
    pipeline, bare, inside, n = [], [], [], 0
    for r in range(repeats):
        out = work / f"emb-{r}"
        summary = precompute_embeddings(pattern, str(t5), out, batch_size=batch_size, progress_bar=False)
        pipeline.append(summary["seconds"] - summary["load_seconds"])
        inside.append(summary["encoder_seconds"])
        n = summary["samples_written"]
        shutil.rmtree(out)
        t0 = time.perf_counter()
        for shard in per_shard:
            for i in range(0, len(shard), batch_size):
                enc.encode_tokens(enc.tokenize(shard[i:i + batch_size], 128))
        bare.append(time.perf_counter() - t0)
    pipeline_s, bare_s = statistics.median(pipeline), statistics.median(bare)
    return {"encoder": "random T5, d_model 512, 6 layers, 8 heads (t5-small size)", "device": "cpu",
            "dtype": "fp32", "batch_size": batch_size, "samples": n, "shards": len(shards),
            "repeats": repeats, "precompute_samples_per_s": round(n / pipeline_s, 1),
            "bare_encoder_samples_per_s": round(n / bare_s, 1),
            "io_overhead_pct": round(100 * (pipeline_s - bare_s) / pipeline_s, 1),
            # Wall time the pipeline spends outside encoder calls (the I/O that is not hidden).
            "time_outside_encoder_pct": round(100 * (pipeline_s - statistics.median(inside)) / pipeline_s, 1),
            "encoder_slowdown_in_pipeline": round(statistics.median(inside) / bare_s, 3)}


def bench_resume(pattern: str, steps: list[int], batch: int, buffer: int, shard_size: int) -> list[dict]:
    """Re-read cost of a resume after each number of batches in `steps` (loader stats)."""
    import json as _json

    cfg = Config(stage="base64", model=ModelConfig(kind="unet"), text=TextConfig(embed_dim=EMBED_DIM, max_length=128),
                 data=DataConfig(train_shards=pattern, num_workers=0, shuffle_buffer=buffer),
                 training=TrainingConfig(micro_batch_size=batch, global_batch_size=batch))
    rows = []
    for n in steps:
        first = build_train_loader(cfg, 0, 1)
        for _ in range(n):
            next(first)
        state = _json.loads(_json.dumps(first.state_dict()))
        t0 = time.perf_counter()
        resumed = build_train_loader(cfg, 0, 1)
        resumed.load_state_dict(state)
        next(resumed)
        dt = time.perf_counter() - t0
        stats = resumed.stats
        rows.append({"batches_before": n, "samples_consumed": n * batch, "buffer": buffer, "shard_size": shard_size,
                     "reread_samples": stats["reread_samples"], "reread_mib": round(stats["reread_bytes"] / 2**20, 2),
                     "seconds_to_first_batch": round(dt, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="samples per resolution (1024 px: a quarter)")
    parser.add_argument("--out", default="/tmp/imagen-bench-data", help="scratch folder (deleted first)")
    parser.add_argument("--batch-size", type=int, default=64, help="precompute batch size")
    parser.add_argument("--precompute-samples", type=int, default=2048,
                        help="64 px samples (shards of 256) for the precompute comparison")
    parser.add_argument("--parts", default="loader,precompute,resume", help="comma-separated parts to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    results = {"torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "loader": []}
    for res in (64, 256, 1024) if "loader" in parts else ():
        n = args.samples if res < 1024 else max(16, args.samples // 4)
        write_synthetic(work / f"raw{res}", n, res, shard_size=256, image_format="jpg", progress_bar=False)
        pattern = add_fake_embeddings(work / f"raw{res}", work / f"emb{res}")
        batch = 16 if res < 1024 else 4
        results["loader"].append(bench_loader(pattern, res, max(2, n // batch - 2), batch))
    if "precompute" in parts:
        write_synthetic(work / "raw-precompute", args.precompute_samples, 64, shard_size=256, image_format="jpg",
                        progress_bar=False)
        results["precompute"] = bench_precompute(work / "raw-precompute", work, args.batch_size)
    if "resume" in parts:
        write_synthetic(work / "raw-resume", 4096, 64, shard_size=128, image_format="jpg", progress_bar=False)
        pattern = add_fake_embeddings(work / "raw-resume", work / "emb-resume")
        results["resume"] = bench_resume(pattern, [10, 100, 1000], batch=16, buffer=256, shard_size=128)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
