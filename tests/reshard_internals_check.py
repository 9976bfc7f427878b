"""Run by tests/test_resume_reshard.py under torchrun (2 ranks): what we read of DeepSpeed below
its API (training/deepspeed_internals.py), at every ZeRO stage, and a re-slice from each stage
into another, in one process.

Every engine built here is probed (`deepspeed_internals.probe`: each entry of INTERNALS that
applies to it, read by name) and every saved checkpoint too (`probe_checkpoint`: the file keys a
re-slice reads); rank 0 prints one `INTERNAL <name>` line per entry read, and one `FILEKEY
<kind> <key>` line per file key, so the test can check that the cases reach every entry.

For each (saved stage, loaded stage, precision): a small network trains 3 steps through our
`engine.create_engine` (our DeepSpeed config and LR schedule), is saved, and a fresh engine of the
other stage loads it with `load_resharded` (training/engine_reshard.py). Both sides are consolidated with
DeepSpeed's public API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`; the torch
optimizer's own state at ZeRO-0), not with our reader, and must be equal element by element:
fp32 masters, exp_avg, exp_avg_sq, Adam's step, the LR, the step counters, and the module's
weights (the masters in the module's dtype). Then one more step on each, on the same data, must
agree to rounding. Prints one line per case, `CASE ... ok`; any failure raises.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.training import deepspeed_internals, engine  # noqa: E402
from imagen_train.utils import dist  # noqa: E402

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

KEYS = ("exp_avg", "exp_avg_sq")
# (saved stage, loaded stage, precision); bf16 at ZeRO-1 with fp32 gradient accumulation is
# DeepSpeed's BF16_Optimizer, at ZeRO-0 its FP16_UnfusedOptimizer (torch's AdamW is not fused
# into DeepSpeed's flat groups).
CASES = [(0, 3, "fp32"), (3, 1, "fp32"), (1, 2, "fp32"), (2, 0, "fp32"),
         (2, 3, "bf16"), (3, 1, "bf16-fp32-accum"), (1, 0, "bf16"), (0, 2, "bf16")]


class Net(torch.nn.Module):
    """Uneven parameter sizes, so that ZeRO partitions cut parameters in the middle."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.norm = torch.nn.GroupNorm(1, 5)
        self.head = torch.nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).flatten(1))


def build(stage: int, precision: str, repo: Path):
    cfg = load_config(str(repo / "configs" / "base64-tiny.yaml"), [
        f"training.zero_stage={stage}", f"training.precision={precision.split('-')[0]}",
        "training.micro_batch_size=2", "training.global_batch_size=4", "optim.lr=1e-2",
        "lr_schedule.warmup_steps=5", "training.max_steps=10", "training.grad_clip=0"])
    if precision.endswith("fp32-accum"):
        cfg.training.deepspeed_extra = {"data_types": {"grad_accum_dtype": "fp32"}}
    torch.manual_seed(0)
    built = engine.create_engine(cfg, Net())
    for name in deepspeed_internals.probe(built.deepspeed):
        dist.print0(f"INTERNAL {name}")
    return built


def train_step(eng, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed * 10 + dist.rank())
    x = torch.randn(2, 3, 4, 4, generator=gen).to(eng.dtype)
    eng.backward(eng(x).float().pow(2).mean())
    assert eng.step()


def consolidated(eng) -> dict:
    """Full fp32 masters and optimizer state per parameter, by DeepSpeed's public API (the torch
    optimizer's state at ZeRO-0), plus the module's weights, Adam's step, LR and counters, of
    a DeepSpeed engine (`DeepSpeedEngine.deepspeed`)."""
    kind, out = deepspeed_internals.optimizer_kind(eng), {}
    opt = deepspeed_internals.torch_optimizer(eng)
    named = [(n, p) for n, p in eng.module.named_parameters()]
    if kind == "fp16":  # FP16_Optimizer: one flat fp32 master per group, in the module's order
        flat, group = eng.optimizer.fp32_groups_flat[0], eng.optimizer.fp16_groups[0]
        assert len(eng.optimizer.fp32_groups_flat) == 1
        pieces = {key: torch._utils._unflatten_dense_tensors(t, group)
                  for key, t in [("fp32", flat)] + [(k, opt.state[flat][k]) for k in KEYS]}
        for i, (n, _) in enumerate(named):
            out[n] = [pieces["fp32"][i].clone()] + [pieces[k][i].clone() for k in KEYS]
    if kind == "fp16-unfused":  # FP16_UnfusedOptimizer: one fp32 master per parameter
        masters = [m for group in eng.optimizer.fp32_groups for m in group]
        for (n, _), m in zip(named, masters):
            out[n] = [m.data.clone()] + [opt.state[m][k].clone() for k in KEYS]
    for n, p in named:
        if kind == "torch":
            out[n] = [p.data.clone()] + [opt.state[p][k].clone() for k in KEYS]
        elif not kind.startswith("fp16"):
            out[n] = [safe_get_full_fp32_param(p)] + [safe_get_full_optimizer_state(p, k) for k in KEYS]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None,
                                           enabled=eng.zero_optimization_stage() == 3):
        weights = {n: p.data.clone() for n, p in named}
    steps = {float(s["step"]) for s in opt.state.values()}
    return {"params": out, "weights": weights, "steps": steps, "lr": eng.get_lr(),
            "counters": (eng.global_steps, eng.global_samples, eng.skipped_steps),
            "schedule": eng.lr_scheduler.state_dict()}


def same(a: dict, b: dict, what: str) -> None:
    assert a["params"].keys() == b["params"].keys(), what
    for name, (x, y) in ((n, (a["params"][n], b["params"][n])) for n in a["params"]):
        for label, u, v in zip(("fp32 master", *KEYS), x, y):
            assert torch.equal(u.float(), v.float()), f"{what}: {label} of {name} differs"
    for name, weight in b["weights"].items():
        master = b["params"][name][0].to(weight.dtype).reshape(weight.shape)
        assert torch.equal(weight, master), f"{what}: module weight {name} does not follow its fp32 master"
    assert a["steps"] == b["steps"] and len(a["steps"]) == 1, (what, a["steps"], b["steps"])
    assert a["lr"] == b["lr"] and a["counters"] == b["counters"], (what, a["lr"], b["lr"], a["counters"], b["counters"])
    assert a["schedule"] == b["schedule"], what


def main() -> None:
    repo, folder = Path(sys.argv[1]), Path(sys.argv[2])
    engine.init_distributed(600)
    for saved_stage, loaded_stage, precision in CASES:
        what = f"ZeRO {saved_stage} -> {loaded_stage} {precision}"
        old = build(saved_stage, precision, repo)
        for step in range(3):
            train_step(old, step)
        layout = old.optimizer_layout()
        tag = f"s{saved_stage}{loaded_stage}{precision}"
        old.save(folder / tag)
        dist.barrier()
        for file in layout["files"].values():
            assert (folder / tag / file).is_file(), f"{what}: {file} named by the layout is not in the checkpoint"
        for key in deepspeed_internals.probe_checkpoint(old.deepspeed, folder / tag):
            dist.print0(f"FILEKEY {layout['kind']} {key}")
        before = consolidated(old.deepspeed)
        new = build(loaded_stage, precision, repo)
        new.load_resharded(folder / tag, dist.all_gather_object(layout))
        same(before, consolidated(new.deepspeed), what)
        # Training goes on alike: one more step of each on the same data.
        train_step(old, 3)
        train_step(new, 3)
        after_old, after_new = consolidated(old.deepspeed), consolidated(new.deepspeed)
        for name in after_old["params"]:
            torch.testing.assert_close(after_new["params"][name][0], after_old["params"][name][0], rtol=1e-5,
                                       atol=1e-6, msg=f"{what}: {name} after one more step")
        dist.print0(f"CASE {what} ok")
        del old, new


if __name__ == "__main__":
    main()
    from imagen_train.utils.dist import exit_process
    exit_process(0)  # as launch/train.py: no interpreter teardown under live gloo threads
