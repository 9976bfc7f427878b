"""Loading a stage for inference: a normal build (default initialisation) against a build on the
meta device plus the exported weights read straight to the device (artifacts.load_exported).

    python bench/load_stage.py --preset base64-2b --export /tmp/base64-2b.safetensors
    python bench/load_stage.py --preset base64-2b --device cuda --old

Writes a random-weight export first if `--export` names no file (fp32 unless `--dtype`; the
file is then in the page cache, so the load is not a cold read from disk). Each measurement runs
in a process of its own (fresh allocator, one copy of the weights at a time):

- build: `build_model` on the device with its default initialisation;
- meta build: `build_model(device="meta")`, nothing allocated;
- meta + load: `load_exported(path, device=...)`, the way sampling loads a stage now;
- old load (`--old`): the previous way, a normal build, then `load_state_dict` from the file
  (two copies of the weights in memory at once).

Then every weight is read once (`touch_s`): on a CPU, safetensors maps the file and its pages
come in when first used, so part of a CPU load's cost lands in the first forward pass. On a
GPU the weights are copied to the device during the load itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: str, preset: str, export: str, device: torch.device, embed_dim: int) -> dict[str, Any]:
    """Seconds for one `step` (build, meta_build, meta_load, old_load) in this process."""
    from safetensors.torch import load_file

    from imagen_train.config import load_preset
    from imagen_train.models import build_model, count_parameters
    from imagen_train.artifacts import load_exported

    cfg = load_preset(preset, [f"text.embed_dim={embed_dim}"])
    torch.zeros(1, device=device)  # a GPU's context is made before the clock starts
    _sync(device)
    start = time.perf_counter()
    if step == "build":
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device=device)
    elif step == "meta_build":
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device="meta")
    elif step == "meta_load":
        net, _ = load_exported(export, device=device)
    elif step == "old_load":
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
        net.load_state_dict({k[len("ema."):]: v for k, v in load_file(export).items() if k.startswith("ema.")})
        net = net.to(device)
    else:
        raise ValueError(f"unknown step {step!r}")
    _sync(device)
    seconds = time.perf_counter() - start
    touch_s = None
    if step != "meta_build":  # read every weight once: a CPU load maps the file, pages come in on use
        start = time.perf_counter()
        with torch.no_grad():
            total = sum(p.sum() for p in net.parameters())
        float(total)
        touch_s = time.perf_counter() - start
    return {"step": step, "seconds": seconds, "touch_s": touch_s, "params": count_parameters(net)}


def write_export(preset: str, path: Path, embed_dim: int, dtype: torch.dtype, device: torch.device) -> float:
    """A random-weight export of `preset` (built on `device`, saved in `dtype`); seconds taken."""
    from safetensors.torch import save_file

    from imagen_train.config import load_preset
    from imagen_train.models import build_model
    from imagen_train.artifacts import CONFIG_KEY

    start = time.perf_counter()
    cfg = load_preset(preset, [f"text.embed_dim={embed_dim}"])
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device=device)
    tensors = {f"ema.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    del net
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    return time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base64-2b")
    parser.add_argument("--export", default=None, help="the export to load (written first if missing)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of a newly written export")
    parser.add_argument("--embed-dim", type=int, default=None, help="text width (default: the preset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--old", action="store_true", help="also time the old load (two copies in memory)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.embed_dim is None:
        from imagen_train.config import load_preset
        args.embed_dim = load_preset(args.preset).text.embed_dim
    export = Path(args.export or f"/tmp/{args.preset}-random.safetensors")
    if args.step:
        print("RESULT " + json.dumps(measure(args.step, args.preset, str(export), device, args.embed_dim)), flush=True)
        return {}

    result: dict[str, Any] = {"preset": args.preset, "device": args.device, "export": str(export),
                              "embed_dim": args.embed_dim, "torch": torch.__version__,
                              "threads": args.threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_before": os.getloadavg()}
    if not export.is_file():
        result["export_written_s"] = write_export(args.preset, export, args.embed_dim, DTYPES[args.dtype], device)
    result["export_bytes"] = export.stat().st_size
    steps = ["build", "meta_build", "meta_load"] + (["old_load"] if args.old else [])
    result["steps"] = {}
    for step in steps:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--export", str(export), "--device", args.device,
               "--embed-dim", str(args.embed_dim), "--step", step]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{step} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        result["steps"][step] = json.loads(lines[-1][len("RESULT "):])
        touch = result["steps"][step]["touch_s"]
        print(f"[load_stage] {step:>10}: {result['steps'][step]['seconds']:.3f} s"
              + ("" if touch is None else f", then {touch:.3f} s to read every weight once"), flush=True)
    result["load_avg_after"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
