"""EMA arithmetic (training/ema.py): one multi-tensor update equals the per-tensor formula."""

from __future__ import annotations

import torch

from imagen_train.training.ema import EMA


def test_update_is_the_lerp_of_every_slice_including_empty_ones():
    torch.manual_seed(0)
    weights = {"a": torch.randn(5), "b": torch.randn(3, 4).view(-1), "empty": torch.zeros(0)}
    ema = EMA(lambda: weights.items(), decay=0.9, warmup_steps=4)
    expected = {k: v.clone() for k, v in weights.items()}
    for step in range(1, 6):
        for v in weights.values():
            v.add_(torch.randn_like(v))
        ema.update(step)
        decay = min(0.9, (1 + step) / (4 + step))
        for k, v in weights.items():
            expected[k] = decay * expected[k] + (1 - decay) * v
    for k in weights:
        torch.testing.assert_close(ema.shadow[k], expected[k], rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 5 and ema.shadow["empty"].numel() == 0


def test_update_every_n_steps_skips_the_others():
    w = torch.ones(2)
    ema = EMA(lambda: [("w", w)], decay=0.5, update_every_steps=2)
    w.fill_(3.0)
    ema.update(1)
    assert torch.equal(ema.shadow["w"], torch.ones(2)) and ema.num_updates == 0
    ema.update(2)
    assert torch.equal(ema.shadow["w"], torch.full((2,), 2.0)) and ema.num_updates == 1
