"""What accumulating bf16 gradients in fp32 costs: DeepSpeed's resolved dtypes, the bytes its
optimizer holds in the middle of an accumulation, and the step time, at each ZeRO stage. Run
under torchrun (one rank is enough):

    torchrun --nproc_per_node 1 bench/grad_accum.py --stages 1 2 3 --accum 4 --steps 4 --json OUT

For each ZeRO stage and each `training.grad_accum_dtype` (fp32, bf16) a small base64 network
(32 px, channel_mult [1, 2]: bf16 convolutions are ~70x slower than fp32 on AVX2 CPUs) is
trained in bf16 for `--steps` optimizer steps of `--accum` micro batches of random images and
text, through training.engine.create_engine (so the DeepSpeed config is the one the trainer
gets). Recorded per run: DeepSpeed's (model, accumulation) dtypes (engine.get_data_types), its
optimizer class, the bytes of every distinct tensor storage reachable from the optimizer after
the first micro batch of the last step (by dtype: the accumulation buffers are live then; the
reduce and all-gather buckets set to the network's size, not DeepSpeed's 5e8 elements), the
median step time after the first step, the losses, and how many fp32 master elements the EMA
finds on this rank (the engine's master_weights: ZeRO-1 under fp32 accumulation runs
DeepSpeed's BF16_Optimizer, another optimizer class). The difference between the two runs of
a stage, over the parameter count, is the memory fp32 accumulation adds per parameter.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagen_train.config import load_preset  # noqa: E402
from imagen_train.diffusion import build_diffusion  # noqa: E402
from imagen_train.models import build_model  # noqa: E402
from imagen_train.training import engine, speed  # noqa: E402
from imagen_train.utils import dist  # noqa: E402

# A network small enough for bf16 on a CPU (tests/test_training.py's BF16_TINY).
SMALL = ["train_resolution=32", "model.channel_mult=[1,2]", "model.attention_resolutions=[16]",
         "model.num_head_channels=8", "training.precision=bf16", "training.micro_batch_size=2",
         "lr_schedule.warmup_steps=0", "optim.lr=1e-3"]


def held_tensor_bytes(root, depth: int = 6) -> dict[str, int]:
    """Bytes of the distinct tensor storages reachable from `root` through DeepSpeed's and torch's
    optimizer objects (attributes, lists, dicts; a tensor's `.grad` and DeepSpeed's `.grad_accum`
    too), by dtype."""
    seen_objects, seen_storages, out = set(), set(), {}

    def visit(obj, left: int) -> None:
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                out[str(obj.dtype)] = out.get(str(obj.dtype), 0) + storage.nbytes()
            for grad in (obj.grad, getattr(obj, "grad_accum", None)):
                if grad is not None:
                    visit(grad, left)
            return
        if left == 0 or id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        else:
            return
        for item in items:
            visit(item, left - 1)

    visit(root, depth)
    return out


def run(stage: int, accum_dtype: str, accum: int, steps: int, device: torch.device) -> dict:
    """Train `steps` steps at ZeRO `stage` with gradients accumulated in `accum_dtype`."""
    torch.manual_seed(0)
    cfg = load_preset("base64-tiny", SMALL)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    numel = sum(p.numel() for p in net.parameters())
    # DeepSpeed's reduce and all-gather buckets default to 5e8 elements (1 GB in bf16), which
    # would swamp a small network's buffers: one bucket the size of the network instead.
    bucket = numel + numel % 2
    cfg = load_preset("base64-tiny", SMALL + [
        f"training.zero_stage={stage}", f"training.grad_accum_dtype={accum_dtype}",
        f"training.global_batch_size={2 * accum * dist.world_size()}",
        f"training.deepspeed_extra={{zero_optimization: {{reduce_bucket_size: {bucket}, "
        f"allgather_bucket_size: {bucket}}}}}"])
    eng = engine.create_engine(cfg, net)
    caller = speed.network_caller(eng, cfg.training, torch.bfloat16)  # as the trainer calls it
    diffusion = build_diffusion(cfg.diffusion)
    gen = torch.Generator().manual_seed(1)
    res, length, width = cfg.train_resolution, cfg.text.max_length, cfg.text.embed_dim
    losses, times, held = [], [], {}
    for step in range(steps):
        start = time.perf_counter()
        for micro in range(accum):
            images = torch.randn(2, 3, res, res, generator=gen).clamp(-1, 1).to(device)
            emb = torch.randn(2, length, width, generator=gen).to(device)
            mask = torch.ones(2, length, dtype=torch.bool, device=device)
            loss = diffusion.training_loss(caller, images, emb, mask).mean()
            eng.backward(loss)
            losses.append(float(loss))
            if step == steps - 1 and micro == 0:
                held = held_tensor_bytes(eng.deepspeed.optimizer)
        eng.step()
        times.append(time.perf_counter() - start)
    model_dtype, grad_dtype = eng.deepspeed.get_data_types()
    ema_elements = sum(t.numel() for _, t in eng.master_weights())  # the EMA finds its fp32 masters
    row = {"zero_stage": stage, "grad_accum_dtype": accum_dtype, "parameters": numel, "ema_elements": ema_elements,
           "deepspeed_data_types": [str(model_dtype), str(grad_dtype)],
           "optimizer": type(eng.deepspeed.optimizer).__name__, "held_bytes": held,
           "step_s_median": statistics.median(times[1:] or times), "losses": losses}
    del eng, net
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine.init_distributed(600)
    device = engine.current_device()
    rows = []
    for stage in args.stages:
        pair = {d: run(stage, d, args.accum, args.steps, device) for d in ("fp32", "bf16")}
        extra = sum(pair["fp32"]["held_bytes"].values()) - sum(pair["bf16"]["held_bytes"].values())
        for row in pair.values():
            row["fp32_extra_bytes_per_parameter"] = extra / row["parameters"]
            row["step_time_ratio_fp32_over_bf16"] = pair["fp32"]["step_s_median"] / pair["bf16"]["step_s_median"]
            rows.append(row)
        dist.print0(f"ZeRO-{stage}: {pair['fp32']['optimizer']} vs {pair['bf16']['optimizer']}; fp32 accumulation "
                    f"holds {extra / pair['fp32']['parameters']:.2f} more bytes/parameter; step "
                    f"{pair['fp32']['step_s_median']:.2f} s vs {pair['bf16']['step_s_median']:.2f} s")
    if dist.is_main() and args.json:
        out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "world_size": dist.world_size(), "accum": args.accum,
               "steps": args.steps, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
    dist.exit_process(0)  # as launch/train.py: no interpreter teardown under live gloo threads
