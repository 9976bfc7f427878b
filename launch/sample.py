"""Cascaded text-to-image sampling: `python launch/sample.py --config configs/inference_pipeline.yaml
[--set key=value ...]`. Writes images/, grids/ and settings.json under `output_path`."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_train.evaluation.cascade import generate, time_to_first_image, write_outputs  # noqa: E402
from imagen_train.evaluation.pipeline_config import load_pipeline_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/inference_pipeline.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set samplers.base64.steps=50 (repeatable)")
    args = parser.parse_args(argv)
    cfg = load_pipeline_config(args.config, args.overrides)
    prompts = cfg.prompts()
    if not prompts:
        parser.error("no prompts: set `texts` or `prompts_file`")

    result = generate(cfg, prompts)
    path = write_outputs(cfg, result, prompts)
    for s in result.stats:
        steady = f", then {s.steady_images_per_s:.3g} img/s" if s.steady_images else ""
        load = f" (load {s.load_s:.1f} s, first batch {s.first_batch_s:.1f} s{steady})"
        load = "" if s.stage == "text_encoder" else load
        print(f"[sample] {s.stage:>12}: {s.num_images} images in {s.time_s:.1f} s{load}, NFE {s.nfe_per_image}"
              f"{f' + {s.final_nfe_per_image} final' if s.final_nfe_per_image else ''}, "
              f"peak {s.peak_mem_gib:.2f} GiB ({s.mem_kind})", flush=True)
    print(f"[sample] time to first image (one batch through every stage): "
          f"{time_to_first_image(result.stats):.1f} s", flush=True)
    print(json.dumps({"output": cfg.output_path, "settings": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
