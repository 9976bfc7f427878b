"""Sampling benchmark: images/s and peak memory per stage, precision and batch size, laid out
like the reference README's inference-memory table.

    python bench/sampling.py                       # GPU: real presets; CPU: tiny presets
    python bench/sampling.py --presets tiny --precisions 32 --batch-sizes 1 8 --steps 1

Random weights (timing does not depend on them). One cascade run per (precision, batch) covers
the 64, 256 and 1024 columns: a column's memory is the peak of the stages it needs (the stages
run one at a time, each released before the next, the text encoder before all). On a GPU the
memory is torch.cuda.max_memory_allocated; on a CPU, RSS growth (a rough figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

PRESETS = {"tiny": {"base64": "base64-tiny", "sr256": "sr256-tiny", "sr1024": "sr1024-tiny"},
           "real": {"base64": "base64-2b", "sr256": "sr256-400m", "sr1024": "sr1024-400m"}}
REFERENCE_GB = {16: [11.7, 11.9, 12.5, 13.0, 14.1, 21.6], 32: [21.7, 22.6, 23.4, 24.5, 26.6, 40.6],
                "AMP": [22.4, 23.4, 24.0, 25.1, 26.4, 33.7]}


def export_random(preset: str, out: Path, embed_dim: int) -> Path:
    import json as _json

    from safetensors.torch import save_file

    from imagen_train.config import load_preset
    from imagen_train.models import build_model
    from imagen_train.training.export import CONFIG_KEY

    cfg = load_preset(preset, [f"text.embed_dim={embed_dim}"])
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    save_file({f"ema.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={CONFIG_KEY: _json.dumps(cfg.to_dict())})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--presets", choices=sorted(PRESETS), default="real" if gpu else "tiny")
    parser.add_argument("--precisions", nargs="+", default=["16", "32", "AMP"] if gpu else ["32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=20 if gpu else 1, help="sampler steps per stage")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--encoder", default=None, help="T5 folder (default: a tiny random one)")
    parser.add_argument("--out", default="bench/sampling.json")
    args = parser.parse_args()

    from imagen_train.evaluation.cascade import generate
    from imagen_train.evaluation.pipeline_config import load_pipeline_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-sampling-"))
    encoder = args.encoder
    if encoder is None:
        from conftest import build_tiny_t5
        encoder = str(build_tiny_t5(tmp / "t5"))
    from imagen_train.text import load_text_encoder
    embed_dim = load_text_encoder(encoder).embed_dim
    exports = {s: export_random(p, tmp / f"{s}.safetensors", embed_dim) for s, p in PRESETS[args.presets].items()}
    results = []
    for precision in args.precisions:
        mode = int(precision) if precision.isdigit() else precision
        for batch in args.batch_sizes:
            sets = [f"checkpoints.{s}={p}" for s, p in exports.items()] + [
                f"encoder_path={encoder}", f"inference_precision={mode}", f"batch_size={batch}",
                "num_images_per_prompt=1", "target_resolution=1024", f"output_path={tmp / 'out'}",
                "texts=[" + ", ".join(f"prompt {i}" for i in range(batch)) + "]"]
            sets += [f"samplers.{s}.steps={args.steps}" for s in exports]
            sets += [f"samplers.{s}.guidance_scale={args.guidance}" for s in exports]
            cfg = load_pipeline_config(Path(__file__).parent.parent / "configs" / "inference_pipeline.yaml", sets)
            result = generate(cfg, cfg.prompts())
            for s in result.stats:
                row = {"precision": precision, "batch": batch, "stage": s.stage, "images_per_s": s.images_per_s,
                       "peak_mem_gib": s.peak_mem_gib, "mem_kind": s.mem_kind, "time_s": s.time_s,
                       "nfe_per_image": s.nfe_per_image}
                results.append(row)
                print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "presets": args.presets, "steps": args.steps,
                                          "guidance": args.guidance, "rows": results}, indent=2))
    print(table(results, args.batch_sizes, device))


def table(rows: list[dict], batches: list[int], device: str) -> str:
    """Markdown: per precision, memory (max over the stages each column needs) and images/s."""
    need = {64: ["base64"], 256: ["base64", "sr256"], 1024: ["base64", "sr256", "sr1024"]}
    cols = [(res, b) for res in (64, 256, 1024) for b in batches]
    out = [f"device: {device}", "", "| precision | " + " | ".join(f"{r} b{b}" for r, b in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for precision in dict.fromkeys(r["precision"] for r in rows):
        mem, speed = [], []
        for res, b in cols:
            sel = [r for r in rows if r["precision"] == precision and r["batch"] == b]
            stages = [r for r in sel if r["stage"] in need[res]]
            peak = max([r["peak_mem_gib"] for r in sel if r["stage"] == "text_encoder"]
                       + [r["peak_mem_gib"] for r in stages])
            ips = 1 / sum(1 / r["images_per_s"] for r in stages)  # the cascade up to `res`, per image
            mem.append(f"{peak:.2f}")
            speed.append(f"{ips:.3g}")
        out.append(f"| {precision} GiB | " + " | ".join(mem) + " |")
        out.append(f"| {precision} img/s | " + " | ".join(speed) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
