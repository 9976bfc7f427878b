"""Run by tests/test_init_from.py under torchrun: a Trainer started from `training.init_from`.

At step 0 (before any training) it gathers the module's full weights and the EMA (stitched
from every rank's slice) and checks both against the exported tensors, and checks that the
network's output on fixed inputs is identical to the exported network's (rank 0 saves both;
in a bf16 run both in bf16). With `train` as its third argument it then trains the configured
steps, so the test can resume the run; with `step0` it stops there.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.artifacts import load_exported  # noqa: E402
from imagen_train.training.trainer import Trainer  # noqa: E402
from imagen_train.utils import dist  # noqa: E402


def main() -> None:
    import deepspeed
    from safetensors.torch import load_file

    config, out, then = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cfg = load_config(config, sys.argv[4:])
    trainer = Trainer(cfg, resume="none")
    file = load_file(cfg.training.init_from)
    prefix = cfg.training.init_from_weights + "."
    expected = {k[len(prefix):]: v for k, v in file.items() if k.startswith(prefix)}

    net = trainer.engine.deepspeed.module.eval()
    params = list(net.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        weights = {n: p.detach().clone() for n, p in params}
        gen = torch.Generator().manual_seed(0)
        res, L, D = cfg.train_resolution, cfg.text.max_length, cfg.text.embed_dim
        inputs = {"x": torch.randn(2, 3, res, res, generator=gen), "noise_cond": torch.tensor([-0.5, 0.7]),
                  "text_emb": torch.randn(2, L, D, generator=gen),
                  "text_mask": torch.arange(L).expand(2, L) < torch.tensor([[5], [L]])}
        dtype = next(net.parameters()).dtype  # bf16 in a bf16 run; the noise levels stay fp32
        inputs = {k: (v.to(dtype) if k in ("x", "text_emb") else v) for k, v in inputs.items()}
        with torch.no_grad():
            output = net(**inputs)
    # The exported network, run here (same threads and kernels): the outputs are identical.
    exported, _ = load_exported(cfg.training.init_from, weights=cfg.training.init_from_weights)
    exported = exported.to(dtype)
    with torch.no_grad():
        exported_output = exported(**inputs)
    gap = (output - exported_output).abs().max().item()
    assert torch.equal(output, exported_output), f"step-0 outputs differ from the export's by {gap}"
    net.train()
    assert weights.keys() == expected.keys()
    for name, value in weights.items():
        assert torch.equal(value, expected[name].to(value.dtype)), f"module weight {name} differs from the file"
    # The EMA starts from the same weights, the file's fp32 values even in a bf16 run (so the
    # fp32 masters were set from the file, not from the bf16 module): stitch the slices (the
    # ranks' bounds tile each tensor).
    world = dist.world_size()
    for name, entry in trainer.layout.items():
        full = torch.zeros(entry["numel"])
        full[entry["start"]:entry["end"]] = trainer.ema.shadow[name].reshape(-1)
        if world > 1:
            torch.distributed.all_reduce(full)
        assert torch.equal(full.reshape(entry["shape"]), expected[name].float()), f"EMA {name} differs"
    if dist.is_main():
        torch.save({"inputs": inputs, "output": output, "exported_output": exported_output}, out)
    dist.barrier()
    if then == "train":
        trainer.run()


if __name__ == "__main__":
    main()
    from imagen_train.utils.dist import exit_process
    exit_process(0)  # as launch/train.py: no interpreter teardown under live gloo threads
