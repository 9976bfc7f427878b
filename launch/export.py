"""Export a checkpoint: `python launch/export.py runs/sr256-400m/checkpoints --out runs/sr256-400m/ema.safetensors`.

The checkpoint may be a checkpoints root (its `latest` is exported) or one step_NNNNNNNN folder.
A missing, incomplete or corrupt checkpoint is named in one line on stderr (exit 2). In Python:
`imagen_train.artifacts.export_checkpoint(folder, out_path, include_raw, dtype)`.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from imagen_train.artifacts import CheckpointError, export_checkpoint, find_checkpoint  # noqa: E402
from imagen_train.config import ConfigError  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_main(argv: list[str] | None = None) -> None:
    """Parse the command line, export, print {"export", "config"} as JSON."""
    parser = argparse.ArgumentParser(description="Export a training checkpoint to safetensors "
                                     "(EMA weights + resolved config), loadable without DeepSpeed.")
    parser.add_argument("checkpoint", help="a checkpoint folder (step_NNNNNNNN) or a checkpoints root")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--raw", action="store_true", help="also store the raw (non-EMA) weights")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    out = export_checkpoint(find_checkpoint(args.checkpoint), args.out, args.raw, DTYPES[args.dtype])
    print(json.dumps({"export": str(out), "config": str(out.with_suffix(".yaml"))}))


def main(argv: list[str] | None = None) -> int:
    """Run the export; 2 with a one-line message for a checkpoint that cannot be exported."""
    try:
        export_main(argv)
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"[export] {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
