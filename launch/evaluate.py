"""FID and CLIP score over a sweep of guidance scales:
`[torchrun --nproc_per_node N] launch/evaluate.py --config configs/inference_pipeline.yaml
 --out DIR [--set evaluation.captions_file=captions.txt ...]`.

Samples one image per caption (`evaluation.images_per_caption`) at `evaluation.resolution`
(256) for each guidance scale, and writes DIR/sweep.csv, sweep.md, sweep.png (FID vs CLIP curve)
and sweep.json. A missing or mismatched input (encoder, checkpoints, statistics of another
resolution, metric weights) is said once, in one line, before anything loads (exit 2)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_train.config import ConfigError  # noqa: E402
from imagen_train.evaluation.fid import FIDStatsPipelineError  # noqa: E402
from imagen_train.evaluation.pipeline_config import load_pipeline_config  # noqa: E402
from imagen_train.evaluation.sweep import run_sweep  # noqa: E402
from imagen_train.evaluation.weights import MissingWeightsError  # noqa: E402
from imagen_train.utils.dist import exit_process, init_from_env, rank, shutdown  # noqa: E402

# What refuses a sweep before it samples: every process meets the same one.
REFUSALS = (ConfigError, MissingWeightsError, FIDStatsPipelineError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/inference_pipeline.yaml")
    parser.add_argument("--out", required=True, help="folder for the table and the plot")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set evaluation.guidance_scales=[1,3,5] (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.config, args.overrides)
        init_from_env()
        run_sweep(cfg, args.out)
    except REFUSALS as err:
        if rank() == 0:
            print(f"[evaluate] refused: {err}", file=sys.stderr, flush=True)
        return 2
    shutdown()
    return 0


if __name__ == "__main__":
    exit_process(main())
