"""Run under 2 ranks by tests/test_training.py: the sharded EMA against a full-parameter EMA.

Trains a tiny stage in-process; after every step it gathers the full parameters (ZeRO-3) and
keeps an EMA of them by hand. At the end it checks the stitched per-rank EMA against the hand
EMA, and rank 0 saves the hand-EMA network's output on fixed inputs for the test to compare
with the exported file.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.models import build_model  # noqa: E402
from imagen_train.training.trainer import Trainer  # noqa: E402
from imagen_train.utils import dist  # noqa: E402


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    overrides = sys.argv[3:]
    cfg = load_config(config, overrides)
    hand: dict[str, torch.Tensor] = {}

    def full_params(engine) -> dict[str, torch.Tensor]:
        import deepspeed
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().float().clone() for n, p in params}

    def track(trainer) -> None:
        current = full_params(trainer.engine)
        decay = trainer.ema.decay_at(trainer.step)
        for name, value in current.items():
            hand[name] = hand[name].lerp_(value, 1 - decay) if name in hand else value

    trainer = Trainer(cfg, resume="none", callbacks=[track])
    # The EMA starts from the initial weights, as the trainer's does.
    hand.update(full_params(trainer.engine))
    trainer.run()

    # Stitch the ranks' EMA slices and compare with the hand EMA on every rank.
    stitched = {}
    for name, entry in trainer.layout.items():
        local = trainer.ema.shadow[name].reshape(-1)
        parts = [torch.empty_like(local) for _ in range(dist.world_size())]
        torch.distributed.all_gather(parts, local)
        stitched[name] = torch.cat(parts)[: entry["numel"]].reshape(entry["shape"])
    worst = max((stitched[n] - hand[n]).abs().max().item() for n in hand)
    assert worst < 1e-6, f"sharded EMA differs from the full-parameter EMA by {worst}"

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
        torch.save({"inputs": inputs, "output": output, "max_ema_error": worst}, out)
    dist.barrier()


if __name__ == "__main__":
    main()
