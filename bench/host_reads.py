"""Count the device reads of one sampling run: operators that make the host wait for a device value.

    python bench/host_reads.py [--sampler edm_heun] [--steps 30] [--guidance 7.5] [--interval 0.3 15]

A read (`.item()`, `bool(t)`, `float(t)`, `nonzero`, `equal`, ...) stops the host until the GPU
has run everything queued, so it cannot queue the next network call meanwhile. Every one of them
dispatches an operator with a data-dependent result (`aten._local_scalar_dense` and the others in
READS), which a TorchDispatchMode sees on any device, a CPU too; `Tensor.tolist` is counted by
wrapping it. The network is a stand-in with the UNets' signature: this counts the sampler,
guidance, preconditioning and thresholding around it (tests/test_sampling_speed.py counts the
tiny UNet too). Run it with PYTHONPATH set to another checkout to count that code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: another checkout can be counted
from imagen_train.config import SamplerConfig  # noqa: E402
from imagen_train.diffusion import build_diffusion  # noqa: E402
from imagen_train.schema import DiffusionConfig  # noqa: E402

READS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "allclose", "masked_select", "unique",
         "_unique2", "unique_consecutive"}


class Reads(TorchDispatchMode):
    """Counts the operators of READS run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in READS
        return func(*args, **(kwargs or {}))


def stand_in(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
    """A smooth network of the UNets' signature (dynamic thresholding gets values to clip)."""
    return 3 * torch.tanh(x) * (1 + noise_cond[:, None, None, None]) + text_emb.mean(dim=(1, 2))[:, None, None, None]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", default="edm_heun")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--interval", type=float, nargs=2, default=[0.3, 15.0], help="guidance_interval")
    args = parser.parse_args(argv)
    sampler = SamplerConfig(name=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                            guidance_interval=list(args.interval), thresholding="dynamic")
    diffusion = build_diffusion(DiffusionConfig())
    emb, mask = torch.randn(1, 8, 8), torch.ones(1, 8, dtype=torch.bool)
    tolist, calls = torch.Tensor.tolist, [0]
    torch.Tensor.tolist = lambda t: calls.__setitem__(0, calls[0] + 1) or tolist(t)
    try:
        with Reads() as reads:
            result = diffusion.sample(stand_in, (1, 3, 8, 8), emb, mask, sampler)
    finally:
        torch.Tensor.tolist = tolist
    out = {"network_calls": result.nfe, "scalar_reads": reads.count, "tolist": calls[0]}
    print(f"{args.sampler}, {args.steps} steps, guidance {args.guidance} in {args.interval}: {out['network_calls']} "
          f"network calls, {out['scalar_reads']} scalar reads, {out['tolist']} tolist")
    return out


if __name__ == "__main__":
    main()
