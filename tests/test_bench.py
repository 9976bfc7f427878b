"""The training-step benchmark (bench/train_step.py) at tiny size: sane numbers, exact FLOP
counts on known layers, and the diffusers peer (skipped where bench requirements are absent)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import train_step  # noqa: E402

TINY = str(REPO / "configs" / "base64-tiny.yaml")
SMOKE = ["--config", TINY, "--batch", "2", "--steps", "2", "--warmup", "1", "--rounds", "2", "--threads", "1",
         "--matmul-n", "512", "--matmul-reps", "2"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_flops_of_known_layers_are_exact():
    # Linear, input without grad: forward 2BIO, backward only the weight gradient (2BIO).
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(4, 32)
    assert train_step.count_flops(lambda: lin(x).sum().backward()) == 2 * (2 * 4 * 32 * 16)
    # Conv 3x3, same: forward 2 * B * Cout * H * W * Cin * 9, then the weight gradient again.
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    img = torch.randn(2, 3, 8, 8)
    assert train_step.count_flops(lambda: conv(img).sum().backward()) == 2 * (2 * 2 * 8 * 8 * 8 * 3 * 9)
    # Masked SDPA on a CPU (the flash-for-cpu kernel FlopCounterMode does not know by itself):
    # forward QK^T and AV = 4 b h n s d; backward, as torch counts flash kernels, recomputes QK^T
    # and takes four gradient products = 10 b h n s d.
    b, h, n, s, d = 2, 2, 8, 12, 16
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for length in (n, s, s))
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
    flops = train_step.count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward())
    assert flops == 14 * b * h * n * s * d


def test_tiny_step_benchmark_writes_sane_json(tmp_path):
    out = tmp_path / "step.json"
    result = train_step.main(SMOKE + ["--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (ours,) = result["models"]
    assert ours["name"] == "ours" and 0.5e6 < ours["params"] < 2e6
    assert len(ours["step_s"]) == 2 and ours["samples_per_s"] > 0
    assert result["matmul_peak_tflops"] > 0
    # Forward + backward is roughly 3x the forward, which the trainer counts on the meta device.
    from imagen_train.config import load_config
    from imagen_train.training.trainer import count_flops_per_sample
    forward = count_flops_per_sample(load_config(TINY))
    assert 2.0 * forward < ours["flops_per_sample"] < 3.5 * forward
    assert 0 < ours["mfu"] <= 1
    assert ours["peak_mem_gib"] > ours["state_mem_gib"] > 0


def test_sr_stage_feeds_the_lowres_image():
    result = train_step.main(["--config", str(REPO / "configs" / "sr256-tiny.yaml")] + SMOKE[2:])
    assert result["stage"] == "sr256" and result["models"][0]["flops_per_sample"] > 0


def test_peer_is_matched_and_compared(tmp_path):
    pytest.importorskip("diffusers")
    result = train_step.main(SMOKE + ["--peer"])
    ours, peer = result["models"]
    assert abs(peer["params"] / ours["params"] - 1) <= train_step.PEER_TOLERANCE
    assert "SimpleCrossAttnDownBlock2D" in peer["notes"]
    assert len(peer["step_s"]) == len(ours["step_s"]) == 2
    assert peer["flops_per_sample"] > 0 and 0 < peer["mfu"] <= 1
    ratio = result["ratio"]
    assert ratio["samples_per_s"] == pytest.approx(ours["samples_per_s"] / peer["samples_per_s"])
    assert ratio["peak_mem"] == pytest.approx(ours["peak_mem_gib"] / peer["peak_mem_gib"])


def test_norm_act_variants_compute_the_resblock_region():
    """bench/norm_act.py times three forms of the same function: the folded-affine one must equal
    the eager one (values and gradients), and the eager one must be what ResBlock runs."""
    import norm_act
    from imagen_train.models.layers import ResBlock

    torch.manual_seed(0)
    channels = 64
    h = torch.randn(2, channels, 8, 8, requires_grad=True)
    weight, bias = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    scale, shift = torch.randn(2, channels, 1, 1, requires_grad=True), torch.randn(2, channels, 1, 1, requires_grad=True)
    inputs = (h, weight, bias, scale, shift)
    outs, grads = [], []
    for fn in (norm_act.eager, norm_act.folded):
        out = fn(*inputs)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    block = ResBlock(channels, channels, emb_dim=4, num_groups=norm_act.GROUPS).eval()
    seen = {}
    block.conv1.register_forward_hook(lambda m, args, out: seen.__setitem__("conv1_out", out))
    block.conv2.register_forward_pre_hook(lambda m, args: seen.__setitem__("conv2_in", args[0]))
    emb = torch.randn(2, 4)
    with torch.no_grad():
        block(torch.randn(2, channels, 8, 8), emb)
        block_scale, block_shift = block.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        expected = norm_act.eager(seen["conv1_out"], block.norm2.weight, block.norm2.bias, block_scale, block_shift)
    torch.testing.assert_close(seen["conv2_in"], expected)
