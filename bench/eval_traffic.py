"""What one periodic evaluation costs each rank: bytes received from the other ranks, text-encoder
loads and peak added host memory, at each ZeRO stage. Run under torchrun, once per world size:

    torchrun --nproc_per_node 4 bench/eval_traffic.py --t5 T5_DIR --stages 0 1 2 3 --json OUT \
        [--config configs/base64-tiny.yaml] [--set key=value ...]

Per ZeRO stage, on every rank: the stage's network in a real DeepSpeed engine (no training
step), its EMA slices as the trainer keeps them (training.ema.EMA over the engine's master_weights),
and training.ema_network.EMANetwork, the callable the trainer hands the evaluator. Then the
periodic evaluator (evaluation.prompts encoded with the T5 folder `--t5`, one sampler step) is
called three times: `first` (builds the network, encodes and broadcasts the prompts, gathers
the slice bounds), `again` (the steady state: prompts and bounds kept), and `resumed` (a new
evaluator over the same run folder, as after a restart: rank 0 reads the embeddings back from
the cache file). For each: the bytes received (utils.dist.received_bytes, and the logged
eval/received_bytes), the text-encoder loads of this rank, and the peak host memory the call
added (VmHWM above the RSS at its start, as bench/train_step.py's PeakGrowth). Also recorded:
whether the materialised network equals the initial weights exactly (the EMA before any step),
whether `transformers` was ever imported on this rank, and, for comparison, the bytes the
per-parameter gather this replaced would have received (each slice padded to the widest
slice of its parameter; computed from the same ranks' bounds). Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from imagen_train.config import load_config  # noqa: E402
from imagen_train.evaluation import periodic  # noqa: E402
from imagen_train.models import build_model  # noqa: E402
from imagen_train.training import engine  # noqa: E402
from imagen_train.training.ema import EMA  # noqa: E402
from imagen_train.training.ema_network import EMANetwork  # noqa: E402
from imagen_train.utils import dist  # noqa: E402
from train_step import PeakGrowth  # noqa: E402

PROMPTS = "[a red circle, a blue square]"
encoder_loads = 0


def counting_loader(load):
    """periodic.load_text_encoder, counting the loads on this rank."""
    def load_and_count(*args, **kwargs):
        global encoder_loads
        encoder_loads += 1
        return load(*args, **kwargs)
    return load_and_count


def old_gather_bytes(flats, numels: list[int], elem_bytes: int) -> int:
    """What the per-parameter gather received per rank: (world - 1) x the widest slice of each
    parameter, plus the (world, P, 2) int64 bounds."""
    world = len(flats)
    widest = [0] * len(numels)
    for flat in flats:
        for index, start, end in flat.entries:
            widest[index] = max(widest[index], end - start)
    return (world - 1) * (sum(widest) * elem_bytes + len(numels) * 16)


def evaluate_once(evaluator, materialize, device, out_dir: Path) -> dict:
    loads, received, logged = encoder_loads, dist.received_bytes(), {}
    with PeakGrowth(torch.device("cpu")) as peak:
        evaluator(step=1, materialize_ema=materialize, device=device, log=lambda m, step: logged.update(m),
                  log_image=lambda *a, **k: None, out_dir=out_dir)
    return {"received_bytes": dist.received_bytes() - received, "logged_received_bytes": logged["eval/received_bytes"],
            "encoder_loads": encoder_loads - loads, "peak_added_host_bytes": peak.bytes, "peak_kind": peak.kind}


def measure_stage(args, stage: int, device: torch.device) -> dict:
    cfg = load_config(args.config, args.set + [
        f"run_dir={args.run_dir}/zero{stage}", f"training.zero_stage={stage}", "training.precision=fp32",
        f"text.encoder_path={args.t5}", f"text.embed_dim={args.embed_dim}", "text.max_length=16",
        f"evaluation.prompts={PROMPTS}", "evaluation.eval_every_steps=1", "evaluation.num_images_per_prompt=1",
        "evaluation.sampler.steps=1", "logging.wandb_mode=disabled", "logging.progress_bar=false",
        f"training.global_batch_size={dist.world_size()}"])  # one micro batch of 1 per rank
    torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank, as the trainer
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    eng = engine.create_engine(cfg, net)
    ema = EMA(eng.master_weights, cfg.ema.decay)
    layout = eng.master_layout()
    materialize = EMANetwork(cfg, layout, ema.shadow)
    out_dir = Path(cfg.run_dir) / "samples"
    row = {"zero_stage": stage, "rank": dist.rank(), "world_size": dist.world_size(),
           "parameters": sum(e["numel"] for e in layout.values()), "tensors": len(layout),
           "own_elements": sum(e["end"] - e["start"] for e in layout.values())}
    evaluator = periodic.make_periodic_evaluator(cfg)
    row["first"] = evaluate_once(evaluator, materialize, device, out_dir)
    row["again"] = evaluate_once(evaluator, materialize, device, out_dir)
    row["resumed"] = evaluate_once(periodic.make_periodic_evaluator(cfg), materialize, device, out_dir)
    rebuilt = materialize(torch.float32, device)
    row["matches_initial_weights"] = all(torch.equal(p, initial[n]) for n, p in rebuilt.named_parameters())
    flats = materialize.flat_layouts(device)
    row["flat_lengths"] = [f.length for f in flats]
    row["old_per_parameter_gather_bytes"] = old_gather_bytes(flats, [e["numel"] for e in layout.values()], 4)
    del eng, ema, materialize, rebuilt, net
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "base64-tiny.yaml"))
    parser.add_argument("--t5", required=True, help="a T5 save_pretrained folder (text.embed_dim = its d_model)")
    parser.add_argument("--embed-dim", type=int, default=64, help="the T5's d_model")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", action="append", default=["training.micro_batch_size=1"])
    args = parser.parse_args()
    periodic.load_text_encoder = counting_loader(periodic.load_text_encoder)
    engine.init_distributed(600)
    device = engine.current_device()
    # The counter itself: an all-gather of 1000 fp32 values brings (world - 1) x 4000 bytes.
    before = dist.received_bytes()
    dist.all_gather_equal(torch.ones(1000, device=device))
    counter_check = dist.received_bytes() - before
    rows = [measure_stage(args, stage, device) for stage in args.stages]
    for row in rows:
        row["transformers_imported"] = "transformers" in sys.modules
        row["counter_check_bytes"] = counter_check
    gathered = dist.all_gather_object(rows)
    if dist.is_main() and args.json:
        out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "world_size": dist.world_size(), "device": str(device),
               "rows": [r for rank_rows in gathered for r in rank_rows]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
    dist.exit_process(0)  # as launch/train.py: no interpreter teardown under live gloo threads
