"""Run under 2 ranks by tests/test_training.py: the sharded EMA against a hand EMA of the fp32 masters.

Trains a tiny stage in-process; after every step it assembles the full fp32 master weights
with DeepSpeed's own `safe_get_full_fp32_param` (the module's weights in an fp32 ZeRO-0 run)
and keeps an EMA of them by hand. At the end it checks the stitched per-rank EMA (stitched
with each rank's recorded slice bounds) against the hand EMA on every rank. In a bf16 run it
also checks that an EMA of the bf16 module weights would have differed, so the comparison can
tell the two apart, and that the network training hands the periodic evaluator
(`trainer.materialize_ema`, training/ema_network.py) holds exactly the stitched EMA, in one
window and in windows that cut slices apart, in fp32 and bf16. Rank 0 saves the hand EMA and its network's output on fixed inputs for
the test to compare with the exported file.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.models import build_model  # noqa: E402
from imagen_train.artifacts import stitch  # noqa: E402
from imagen_train.training.trainer import Trainer  # noqa: E402
from imagen_train.utils import dist  # noqa: E402


def fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The full fp32 master weights on every rank (a collective per parameter)."""
    from deepspeed.utils import safe_get_full_fp32_param
    from torch._utils import _unflatten_dense_tensors
    opt = engine.optimizer
    zero0_masters = {}
    if hasattr(opt, "fp32_groups_flat"):  # ZeRO-0 in bf16/fp16: FP16_Optimizer's flat fp32 copies
        for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            zero0_masters.update({id(p): m for p, m in zip(group, _unflatten_dense_tensors(flat, group))})
    elif hasattr(opt, "fp32_groups"):  # ZeRO-0 in bf16/fp16: FP16_UnfusedOptimizer's per-tensor copies
        for group, masters in zip(opt.fp16_groups, opt.fp32_groups):
            zero0_masters.update({id(p): m for p, m in zip(group, masters)})
    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = zero0_masters.get(id(p), p.data)
        out[n] = full.detach().float().clone()
    return out


def module_weights(engine) -> dict[str, torch.Tensor]:
    """The module's own (bf16 in a bf16 run) weights, gathered, as fp32."""
    import deepspeed
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().float().clone() for n, p in params}


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    overrides = sys.argv[3:]
    cfg = load_config(config, overrides)
    hand: dict[str, torch.Tensor] = {}
    hand_lp: dict[str, torch.Tensor] = {}  # the same EMA over the module's (bf16) weights

    def fold(ema: dict, current: dict, decay: float) -> None:
        for name, value in current.items():
            ema[name] = ema[name].lerp_(value, 1 - decay) if name in ema else value

    def track(trainer) -> None:
        decay = trainer.ema.decay_at(trainer.step)
        fold(hand, fp32_masters(trainer.engine.deepspeed), decay)
        fold(hand_lp, module_weights(trainer.engine.deepspeed), decay)

    trainer = Trainer(cfg, resume="none", callbacks=[track])
    # The EMA starts from the initial weights, as the trainer's does.
    hand.update(fp32_masters(trainer.engine.deepspeed))
    hand_lp.update(module_weights(trainer.engine.deepspeed))
    trainer.run()

    # Stitch the ranks' EMA slices at their recorded bounds; compare with the hand EMA.
    world = dist.world_size()
    stitched = {}
    for name, entry in trainer.layout.items():
        local = trainer.ema.shadow[name].reshape(-1)
        bounds = torch.tensor([entry["start"], entry["end"]])
        all_bounds = [torch.empty_like(bounds) for _ in range(world)]
        torch.distributed.all_gather(all_bounds, bounds)
        size = int(max(int(b[1] - b[0]) for b in all_bounds))
        padded = torch.zeros(size)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        pieces = [(int(b[0]), int(b[1]), part) for b, part in zip(all_bounds, parts)]
        stitched[name] = stitch(name, entry["numel"], pieces).reshape(entry["shape"])
    worst = max((stitched[n] - hand[n]).abs().max().item() for n in hand)
    assert worst < 1e-6, f"sharded EMA differs from the hand EMA of the fp32 masters by {worst}"
    # The network training hands the periodic evaluator: exactly the stitched EMA (cast to the
    # sampling dtype), whether the flat EMA is gathered in one window or in windows of a few
    # hundred elements that cut slices and parameters apart.
    materialize = trainer.materialize_ema
    for window_bytes in (materialize.window_bytes, 1000):
        materialize.window_bytes = window_bytes
        for dtype in (torch.float32, torch.bfloat16):
            eval_net = materialize(dtype, torch.device("cpu"))
            for n, q in eval_net.named_parameters():
                assert q.dtype == dtype and torch.equal(q, stitched[n].to(dtype)), (
                    f"the evaluation network's {n} differs from the stitched EMA ({dtype}, window {window_bytes})")
    lp_gap = max((hand_lp[n] - hand[n]).abs().max().item() for n in hand)
    if cfg.training.precision == "bf16":
        assert lp_gap > 100 * max(worst, 1e-7), (
            f"an EMA of the bf16 weights is as close to the fp32-master EMA ({lp_gap}) as ours ({worst}): "
            "the check cannot tell them apart")
    # Every rank keeps a slice, not the whole model (2 ranks: about half each).
    local = sum(t.numel() for t in trainer.ema.shadow.values())
    total = sum(e["numel"] for e in trainer.layout.values())
    assert local < 0.75 * total, f"this rank keeps {local} of {total} EMA elements"

    if dist.is_main():
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).eval()
        net.load_state_dict(hand)
        gen = torch.Generator().manual_seed(0)
        res, L, D = cfg.train_resolution, cfg.text.max_length, cfg.text.embed_dim
        inputs = {"x": torch.randn(2, 3, res, res, generator=gen), "noise_cond": torch.tensor([-0.5, 0.7]),
                  "text_emb": torch.randn(2, L, D, generator=gen),
                  "text_mask": torch.arange(L).expand(2, L) < torch.tensor([[5], [L]])}
        with torch.no_grad():
            output = net(**inputs)
        torch.save({"inputs": inputs, "output": output, "hand_ema": hand, "max_ema_error": worst,
                    "bf16_gap": lp_gap}, out)
    dist.barrier()


if __name__ == "__main__":
    main()
    from imagen_train.utils.dist import exit_process
    exit_process(0)  # as launch/train.py: no interpreter teardown under live gloo threads
