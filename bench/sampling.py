"""Sampling benchmark: time to first image, steady-state images/s and peak memory per precision
and batch size, laid out like the reference README's inference-memory table.

    python bench/sampling.py                                  # GPU: real presets; CPU: tiny presets
    python bench/sampling.py --steps 4 --budget-s 420         # the GPU table in at most 7 minutes
    python bench/sampling.py --presets tiny --precisions 32 --batch-sizes 1 8 --steps 1

Random weights (timing does not depend on them), exported once per stage as launch/export.py
writes them (safetensors; `--export-dtype bf16` halves the bytes to write and read), so each run
loads them as a user's run would; an export already in `--work-dir` for the same preset, width
and dtype is reused (the GPU check's two sampling steps share theirs). `--text-encoder xxl` loads
a T5 encoder of T5-XXL's shape (4.7B parameters, random weights in bf16, made once in the work
dir) so that time to first image includes what loading the real one costs. Each
(precision, network call, batch) runs in a process of its own (a clean memory peak; a run that would
overrun the budget is stopped, and the rest of the table stands) and samples `--batches`
batches through the cascade to the largest of `--resolutions` (1024 px), which covers every
column (64, 256, 1024):

- memory: the peak of the text encoder and the stages a column needs (they run one at a time,
  each released before the next). GPU: torch.cuda.max_memory_allocated; CPU: RSS growth.
- time to first image: the encoder (load + encode), then per stage building the network on the
  meta device, loading its weights, and sampling the first batch (see cascade.time_to_first_image).
- img/s: the steady state, from the batches after the first (kernel selection and allocator
  growth land in the first), the stages up to the column's resolution in series.

Memory does not depend on the number of steps; img/s scales with the network calls (NFE), and
ms per network call, in the JSON, does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagen_train.stages import STAGES, stages_for  # noqa: E402

PRESETS = {"tiny": {name: spec.tiny_preset for name, spec in STAGES.items()},
           "real": {"base64": "base64-2b", "sr256": "sr256-400m", "sr1024": "sr1024-400m"}}
NEED = {spec.output_resolution: list(stages_for(spec.output_resolution)) for spec in STAGES.values()}  # per column
MIN_RUN_S = 20.0  # a run is not started with less of the budget left
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BENCH_KEY = "imagen_train_bench_export"  # metadata naming what an export holds, for its reuse
# T5 v1.1 XXL's encoder (Raffel et al. 2020; the google/t5-v1_1-xxl config): 4.76B parameters.
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu"}


def export_random(preset: str, out: Path, embed_dim: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Path:
    """A stage export with random weights (initialised on `device`, fast on a GPU) in `dtype` and its
    config; an `out` that already holds this preset, width and dtype is reused as it is."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from imagen_train.config import load_preset
    from imagen_train.models import build_model
    from imagen_train.artifacts import CONFIG_KEY

    tag = json.dumps({"preset": preset, "embed_dim": embed_dim, "dtype": str(dtype)})
    if out.is_file():
        with safe_open(str(out), "pt") as f:
            if (f.metadata() or {}).get(BENCH_KEY) == tag:
                return out
    cfg = load_preset(preset, [f"text.embed_dim={embed_dim}"])
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device=device)
    tensors = {f"ema.{k}": v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in net.state_dict().items()}
    del net
    partial = out.with_name(out.name + ".partial")  # a cut export is never taken for a whole one
    save_file(tensors, str(partial), metadata={CONFIG_KEY: json.dumps(cfg.to_dict()), BENCH_KEY: tag})
    os.replace(partial, out)
    return out


def encoder_width(folder: str) -> int:
    """d_model of the T5 encoder saved in `folder`, from its config.json: a process whose exports
    and encoder are already made (the GPU check's table step) then never imports transformers
    (seconds of CPU). A folder without a readable T5 config is loaded, which names what is wrong."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        if config.get("model_type") in ("t5", "umt5", "mt5"):
            return int(config["d_model"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from imagen_train.text import load_text_encoder
    return load_text_encoder(folder).embed_dim


def t5_xxl_shaped(tokenizer_from: str, out: Path, device: torch.device, rehearse: bool = False) -> Path:
    """A T5 encoder of T5-XXL's shape with random bf16 weights and the tokenizer of `tokenizer_from`
    (made once in `out`): loading it costs what loading T5-XXL costs, with nothing to download.
    `rehearse`: the same layout at the width of `tokenizer_from`'s model and 2 layers (CPU)."""
    shape = dict(T5_XXL)
    if rehearse:
        width = encoder_width(tokenizer_from)
        shape.update(d_model=width, d_ff=4 * width, d_kv=16, num_heads=max(1, width // 16), num_layers=2)
    marker = out / "bench-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return out
    from transformers import AutoTokenizer, T5Config, T5EncoderModel  # seconds to import: only to build one

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy of 4.7B weights
    try:
        with torch.device(device):
            model = T5EncoderModel(T5Config(**shape, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(str(out))
    marker.write_text(json.dumps(shape))
    return out


def worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One cascade run of `spec` (precision, batch, ...): every stage's costs."""
    # Python imports (seconds, more on a busy machine) come before the clock: the encoder's load is timed.
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel  # noqa: F401

    from imagen_train.evaluation.cascade import generate
    from imagen_train.evaluation.pipeline_config import load_pipeline_config

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.zeros(1, device=spec["device"])  # a GPU's context is made before the clock starts too
    batch, batches = spec["batch"], spec["batches"]
    sets = [f"checkpoints.{s}={p}" for s, p in spec["exports"].items()] + [
        f"encoder_path={spec['encoder']}", f"inference_precision={spec['precision']}", f"batch_size={batch}",
        "num_images_per_prompt=1", f"target_resolution={spec['resolution']}", f"output_path={spec['out']}",
        f"device={spec['device']}", f"network_call={spec['network_call']}",
        "texts=[" + ", ".join(f"prompt {i}" for i in range(batch * batches)) + "]"]
    sets += [f"samplers.{s}.steps={spec['steps']}" for s in spec["exports"]]
    sets += [f"samplers.{s}.guidance_scale={spec['guidance']}" for s in spec["exports"]]
    cfg = load_pipeline_config(REPO / "configs" / "inference_pipeline.yaml", sets)
    result = generate(cfg, cfg.prompts())
    rows = []
    for s in result.stats:
        calls = (s.steady_images // batch) * (s.nfe_per_image + s.final_nfe_per_image)
        rows.append({"stage": s.stage, "peak_mem_gib": s.peak_mem_gib, "mem_kind": s.mem_kind, "time_s": s.time_s,
                     "load_s": s.load_s, "first_batch_s": s.first_batch_s, "first_image_s": s.first_image_s,
                     "steady_images": s.steady_images, "steady_s": s.steady_s,
                     "steady_images_per_s": s.steady_images_per_s, "nfe_per_image": s.nfe_per_image,
                     "final_nfe_per_image": s.final_nfe_per_image,
                     "net_batch_factor": s.net_batch_factor, "dtype": s.dtype,
                     "ms_per_call": 1e3 * s.steady_s / calls if calls else None})
    return rows


def run_all(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Export, then one worker process per (precision, batch) within the budget."""
    start = time.perf_counter()
    tmp = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-sampling-"))
    tmp.mkdir(parents=True, exist_ok=True)
    encoder = args.encoder
    if encoder is None:
        from imagen_train.text.tiny import build_tiny_t5
        encoder = str(build_tiny_t5(tmp / "t5"))
    embed_dim = encoder_width(encoder)
    if args.text_encoder != "given":
        encoder = str(t5_xxl_shaped(encoder, tmp / f"t5-{args.text_encoder}", device,
                                    rehearse=args.text_encoder == "xxl-rehearsal"))
    stages = NEED[max(args.resolutions)]
    dtype = EXPORT_DTYPES[args.export_dtype]
    exports = {s: str(export_random(PRESETS[args.presets][s], tmp / f"{s}-{args.presets}-{args.export_dtype}.safetensors",
                                    embed_dim, device, dtype))
               for s in stages}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    setup_s = time.perf_counter() - start
    print(f"[bench] exports written in {setup_s:.1f} s: {exports}", flush=True)

    runs = []
    for precision in args.precisions:
        for call in args.network_calls:
            for batch in args.batch_sizes:
                run: dict[str, Any] = {"precision": precision, "network_call": call, "batch": batch,
                                       "label": precision if call == "eager" else f"{precision} {call}"}
                left = args.budget_s - (time.perf_counter() - start)
                if left < args.min_run_s:
                    run["status"] = f"not run: {max(left, 0):.0f} s of the {args.budget_s:.0f} s budget left"
                    runs.append(run)
                    print(f"[bench] {run['label']} b{batch}: {run['status']}", flush=True)
                    continue
                spec = {"precision": precision, "network_call": call, "batch": batch, "batches": args.batches,
                        "steps": args.steps, "resolution": max(args.resolutions), "guidance": args.guidance,
                        "exports": exports, "encoder": encoder, "device": str(device),
                        "out": str(tmp / f"out-{precision}-{call}-{batch}"), "threads": args.threads}
                run.update(_run_worker(spec, timeout_s=left))
                runs.append(run)
                print(json.dumps(run), flush=True)
    return {"device": _device_name(device), "presets": args.presets, "steps": args.steps, "guidance": args.guidance,
            "export_dtype": args.export_dtype, "text_encoder": args.text_encoder,
            "batches": args.batches, "resolutions": sorted(args.resolutions), "budget_s": args.budget_s,
            "setup_s": setup_s, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None, "runs": runs}


def _run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run `worker(spec)` in a fresh process; {"status", "wall_s", "stages"}."""
    begin = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"stopped: over the budget after {timeout_s:.0f} s", "wall_s": time.perf_counter() - begin}
    wall_s = time.perf_counter() - begin
    lines = [line for line in proc.stdout.splitlines() if line.startswith("STAGES ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {"status": f"failed (exit {proc.returncode}): {tail}", "wall_s": wall_s}
    return {"status": "ok", "wall_s": wall_s, "stages": json.loads(lines[-1][len("STAGES "):])}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def column(run: dict[str, Any], res: int) -> Optional[dict[str, float]]:
    """Memory, time to first image and steady img/s of the cascade up to `res` in one run."""
    if run.get("status") != "ok":
        return None
    stages = {s["stage"]: s for s in run["stages"]}
    parts = [stages["text_encoder"]] + [stages[name] for name in NEED[res]]
    steady = [stages[name]["steady_images_per_s"] for name in NEED[res]]
    return {"peak_mem_gib": max(s["peak_mem_gib"] for s in parts),
            "first_image_s": sum(s["first_image_s"] for s in parts),
            "images_per_s": 1 / sum(1 / v for v in steady) if all(steady) else 0.0}


def table(result: dict[str, Any]) -> str:
    """Markdown: per precision, memory, time to first image and steady img/s per column."""
    runs = result["runs"]
    batches = list(dict.fromkeys(r["batch"] for r in runs))
    cols = [(res, b) for res in result["resolutions"] for b in batches]
    out = [f"device: {result['device']}; {result['steps']} steps per stage, guidance {result['guidance']}, "
           f"{result['batches']} batches per run", "",
           "| precision | " + " | ".join(f"{r} b{b}" for r, b in cols) + " |", "|---|" + "---|" * len(cols)]
    for label in dict.fromkeys(r.get("label", r["precision"]) for r in runs):
        cells: dict[str, list[str]] = {"GiB": [], "first image s": [], "img/s": []}
        for res, b in cols:
            run = next(r for r in runs if r.get("label", r["precision"]) == label and r["batch"] == b)
            c = column(run, res)
            if c is None:
                for v in cells.values():
                    v.append(run["status"].split(":")[0])
                continue
            cells["GiB"].append(f"{c['peak_mem_gib']:.2f}")
            cells["first image s"].append(f"{c['first_image_s']:.3g}")
            cells["img/s"].append(f"{c['images_per_s']:.3g}" if c["images_per_s"] else "n/a (1 batch)")
        out += [f"| {label} {name} | " + " | ".join(v) + " |" for name, v in cells.items()]
    kinds = {s["mem_kind"] for r in runs if r.get("status") == "ok" for s in r["stages"]}
    out += ["", f"memory: {', '.join(sorted(kinds)) or 'none measured'}"]
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--presets", choices=sorted(PRESETS), default="real" if gpu else "tiny")
    parser.add_argument("--precisions", nargs="+", default=["16", "32", "AMP"] if gpu else ["32"],
                        choices=["auto", "bf16", "16", "32", "AMP"], help="inference_precision values")
    parser.add_argument("--network-calls", nargs="+", default=["eager"], choices=["eager", "compile", "cuda_graphs"],
                        help="network_call values (each precision runs with each)")
    parser.add_argument("--export-dtype", choices=sorted(EXPORT_DTYPES), default="fp32",
                        help="dtype of the random-weight exports (bf16: half the bytes of fp32)")
    parser.add_argument("--text-encoder", choices=["given", "xxl", "xxl-rehearsal"], default="given",
                        help="given: --encoder as it is; xxl: a random encoder of T5-XXL's shape with its "
                             "tokenizer (load time as T5-XXL's); xxl-rehearsal: that layout, small (CPU)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=20 if gpu else 1, help="sampler steps per stage")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64, 256, 1024], choices=sorted(NEED),
                        help="table columns; each run goes up to the largest")
    parser.add_argument("--batches", type=int, default=2, help="batches per run: the first, then the steady state")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--budget-s", type=float, default=3600.0,
                        help="wall-clock budget for everything (exports included); later runs are skipped")
    parser.add_argument("--min-run-s", type=float, default=MIN_RUN_S, help="do not start a run with less left")
    parser.add_argument("--encoder", default=None, help="T5 folder (default: a tiny random one)")
    parser.add_argument("--work-dir", default=None, help="for the exports and images (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each run")
    parser.add_argument("--out", default="bench/sampling.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("STAGES " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return {}
    if args.batches < 1:
        parser.error("--batches must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_all(args, torch.device("cuda" if gpu else "cpu"))
    result["table"] = table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(result["table"], flush=True)
    return result


if __name__ == "__main__":
    main()
