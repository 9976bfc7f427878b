"""Exponential moving average of the fp32 master weights, kept on the slice each rank owns.

Each rank averages only its own slice of every flattened parameter: the part of the fp32
master weights its optimizer partition holds (ZeRO 1-3), or an equal part (ZeRO-0); see
`Engine.master_weights` (training/engine_api.py). No gathering per step; the slices are stitched together only
when an export or an evaluation needs the whole model (`artifacts.ema.stitch`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for a fixed list of named tensors.

    `views` returns the current (name, tensor) pairs to average; it is called at every update
    because the fp32 master slices are fetched from the optimizer each time (DeepSpeed relinks
    them when a checkpoint is loaded).
    """

    def __init__(self, views: Callable[[], Iterable[tuple[str, torch.Tensor]]], decay: float,
                 warmup_steps: int = 0, update_every_steps: int = 1):
        self.views = views
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.update_every_steps = update_every_steps
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().float().clone() for name, t in views()}
        self.num_updates = 0

    def decay_at(self, step: int) -> float:
        """Effective decay at optimizer step `step` (with the optional warm-up of the decay)."""
        if self.warmup_steps <= 0:
            return self.decay
        return min(self.decay, (1 + step) / (self.warmup_steps + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the current weights after optimizer step `step` (1-based)."""
        if step % self.update_every_steps:
            return
        decay = self.decay_at(step)
        names, tensors = zip(*self.views())
        # One multi-tensor kernel over every slice rather than a kernel launch per parameter
        # (~1,000 of them at the reference presets), which would leave a GPU idle between launches.
        torch._foreach_lerp_([self.shadow[name] for name in names], [t.detach().float() for t in tensors],
                             1.0 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates, "decay": self.decay,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model; differing keys: {sorted(missing)[:5]}")
        for name, tensor in state["shadow"].items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])
