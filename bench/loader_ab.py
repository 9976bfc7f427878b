"""The training loader of this checkout against another's, side by side: samples/s, medians.

    python bench/loader_ab.py --other /tmp/main-checkout [--rounds 4] [--out /tmp/imagen-loader-ab]

Both checkouts' loaders read the same synthetic JPEG shards (64, 256 and 1024 px, width-1024
random float16 embeddings, as bench/data_loader.py writes them) with one worker process, endless
(`data.resampled`), and take the same number of batches. Runs alternate A B B A per round, each
in a fresh process, so load that drifts on a shared machine falls on both alike. Each run
reports its wall seconds and the CPU seconds of its process (`time.process_time`); on a busy
machine the CPU figure is the steadier one. Prints one JSON object: per resolution the medians
and the ratio this/other (> 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_loader import EMBED_DIM, STAGE_FOR, add_fake_embeddings  # noqa: E402  (bench/data_loader.py)
from data_tools.synthetic import write_synthetic  # noqa: E402

BATCHES = {64: (16, 200), 256: (16, 60), 1024: (4, 60)}  # resolution: (batch size, batches timed)

# Runs in a fresh interpreter with one checkout first on sys.path; uses only the public config and
# loader API, which both checkouts share.
TIMED_RUN = """
import json, sys, time
root, pattern, stage, batch, batches, embed_dim = sys.argv[1:7]
sys.path.insert(0, root)
import torch
torch.set_num_threads(1)
import imagen_train
from imagen_train.config import Config, DataConfig, ModelConfig, TextConfig, TrainingConfig
from imagen_train.data import build_train_loader
from imagen_train.stages import STAGES
assert imagen_train.__file__.startswith(root), imagen_train.__file__
batch, batches = int(batch), int(batches)
cfg = Config(stage=stage, model=ModelConfig(kind=STAGES[stage].kind),
             text=TextConfig(embed_dim=int(embed_dim), max_length=128),
             data=DataConfig(train_shards=pattern, num_workers=0, shuffle_buffer=64, resampled=True),
             training=TrainingConfig(micro_batch_size=batch, global_batch_size=batch))
loader = build_train_loader(cfg, 0, 1)
next(loader)  # first shard open, imports
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(batches):
    next(loader)
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "samples": batch * batches}))
"""


def timed_run(root: Path, pattern: str, resolution: int) -> dict:
    """One run of `root`'s loader in a fresh process: {"wall_s", "cpu_s", "samples"}."""
    batch, batches = BATCHES[resolution]
    out = subprocess.run([sys.executable, "-c", TIMED_RUN, str(root), pattern, STAGE_FOR[resolution], str(batch),
                          str(batches), str(EMBED_DIM)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Median samples/s over the runs, by wall and by CPU time."""
    return {"runs": len(runs),
            "samples_per_s_wall": round(statistics.median(r["samples"] / r["wall_s"] for r in runs), 1),
            "samples_per_s_cpu": round(statistics.median(r["samples"] / r["cpu_s"] for r in runs), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, type=Path, help="the other checkout (e.g. `git worktree add`)")
    parser.add_argument("--rounds", type=int, default=4, help="A B B A rounds per resolution")
    parser.add_argument("--out", type=Path, default=Path("/tmp/imagen-loader-ab"), help="scratch folder for shards")
    args = parser.parse_args()
    this, other = ROOT, args.other.resolve()
    results = {"this": str(this), "other": str(other), "by_resolution": {}}
    for res in BATCHES:
        raw, emb = args.out / f"raw{res}", args.out / f"emb{res}"
        if not emb.is_dir():
            write_synthetic(raw, 512 if res < 1024 else 128, res, shard_size=256, image_format="jpg",
                            progress_bar=False)
            add_fake_embeddings(raw, emb)
        pattern = str(emb / ("{00000..%05d}.tar" % (len(list(emb.glob("*.tar"))) - 1)))
        runs: dict[Path, list[dict]] = {this: [], other: []}
        for _ in range(args.rounds):
            for root in (other, this, this, other):
                runs[root].append(timed_run(root, pattern, res))
        a, b = summary(runs[this]), summary(runs[other])
        results["by_resolution"][res] = {"this": a, "other": b,
                                         "ratio_cpu": round(a["samples_per_s_cpu"] / b["samples_per_s_cpu"], 3),
                                         "ratio_wall": round(a["samples_per_s_wall"] / b["samples_per_s_wall"], 3)}
        print(json.dumps({res: results["by_resolution"][res]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
