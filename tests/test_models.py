"""Tests of the denoising networks (`imagen_train/models/`) and the stage presets (`configs/`)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from imagen_train.config import load_preset
from imagen_train.models import build_model, count_parameters
from imagen_train.stages import STAGES

REPO = Path(__file__).resolve().parent.parent
TINY = [stage.tiny_preset for stage in STAGES.values()]
# Preset -> the parameter count its name promises (a test allows 10 % either way).
REFERENCE = {"base64-2b": 2.0e9, "base64-500m": 500e6, "sr256-400m": 400e6, "sr1024-400m": 400e6}


def _build(cfg, **model_changes):
    model_cfg = dataclasses.replace(cfg.model, **model_changes)
    return build_model(model_cfg, cfg.text, cfg.stage, cfg.train_resolution)


def _inputs(cfg, batch: int = 2, size: int | None = None, device: str = "cpu", seed: int = 0) -> dict:
    """Network inputs for `cfg`'s stage; row i has a different number of valid text tokens."""
    size = size or cfg.train_resolution
    length, dim = cfg.text.max_length, cfg.text.embed_dim
    gen = torch.Generator().manual_seed(seed)
    rand = (lambda *shape: torch.empty(*shape, device="meta")) if device == "meta" else (
        lambda *shape: torch.randn(*shape, generator=gen))
    valid = torch.tensor([length // 4 + 3 * i for i in range(batch)])[:, None]  # (B, 1)
    args = dict(x=rand(batch, 3, size, size), noise_cond=rand(batch), text_emb=rand(batch, length, dim),
                text_mask=(torch.arange(length)[None] < valid).to(device))
    if cfg.stage != "base64":
        args.update(lowres=rand(batch, 3, size // 4, size // 4), lowres_noise_cond=rand(batch))
    return args


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: zero-initialised output convs would make every output 0.

    Matrices get N(0, 1 / fan_in) so the signal neither vanishes nor explodes; vectors (norm
    gains, biases, learned queries) get N(0, 0.1^2) added to their initial value.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() > 1:
                param.copy_(noise * (param[0].numel() ** -0.5))
            else:
                param.add_(0.1 * noise)
    return net


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These networks are tiny: one thread avoids OpenMP stalls on a shared CPU (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return load_preset(request.param)


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes and parameter counts.

def test_tiny_forward_shape_dtype(tiny):
    net = _build(tiny).eval()
    args = _inputs(tiny)
    with torch.no_grad():
        out = net(**args)
    assert out.shape == args["x"].shape and out.dtype == torch.float32
    assert torch.all(out == 0), "the output conv is zero-initialised, so a fresh network outputs 0"
    with torch.no_grad():
        out = _randomize(net)(**args)
    assert torch.isfinite(out).all() and out.abs().max() > 0


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_presets_on_meta(name):
    cfg = load_preset(name)
    assert cfg.text.embed_dim == 4096 and cfg.text.max_length == 128
    with torch.device("meta"):
        net = _build(cfg)
    count = count_parameters(net)
    assert abs(count - REFERENCE[name]) <= 0.1 * REFERENCE[name], f"{name}: {count / 1e6:.1f}M parameters"
    args = _inputs(cfg, batch=2, device="meta")
    out = net(**args)
    assert out.shape == args["x"].shape and out.dtype == torch.float32


def test_cpu_benchmark_preset_is_35m():
    """base64-35m, the CPU configuration of bench/train_step.py, has 33-37M parameters."""
    cfg = load_preset("base64-35m")
    with torch.device("meta"):
        count = count_parameters(_build(cfg))
    assert 33e6 <= count <= 37e6, f"{count / 1e6:.2f}M parameters"


def _kinds(step) -> list[str]:
    return [type(block).__name__ for block in step]


def test_efficient_unet_layout():
    """Down: downsample first, then blocks; up: blocks, then upsample; attention where configured."""
    cfg = load_preset("sr1024-400m")
    with torch.device("meta"):
        net = _build(cfg)
    down, up = [_kinds(step) for step in net.down], [_kinds(step) for step in net.up]
    blocks = cfg.model.blocks_per_level()
    for level, kinds in enumerate(down):
        assert (kinds[0] == "Downsample") == (level > 0) and "Downsample" not in kinds[1:]
        assert kinds.count("ResBlock") == blocks[level]
    for kinds in up[:-1]:
        assert kinds[-1] == "Upsample" and "Upsample" not in kinds[:-1]
    assert "Upsample" not in up[-1]
    # sr1024: text cross-attention at the lowest level only, no self-attention anywhere.
    attention = [(i, k) for i, kinds in enumerate(down) for k in kinds if "Attention" in k]
    assert attention == [(len(down) - 1, "CrossAttention")]
    assert [k for kinds in up for k in kinds if "Attention" in k] == ["CrossAttention"]
    assert "Attention" not in " ".join(up[-1] + down[0]), "the top level must be fully convolutional"


def test_base_unet_attention_levels():
    cfg = load_preset("base64-2b")
    with torch.device("meta"):
        net = _build(cfg)
    with_attention = sum("FusedAttention" in _kinds(step) for step in net.down)
    # 3 blocks at each of the 32, 16 and 8 px levels; none at 64 px.
    assert with_attention == 9 and "FusedAttention" not in _kinds(net.down[0])
    assert "FusedAttention" in _kinds(net.middle)


def test_build_model_checks_stage():
    cfg = load_preset("base64-tiny")
    with pytest.raises(ValueError, match="efficient_unet"):
        build_model(cfg.model, cfg.text, "sr256", 256)


def test_tiny_presets_are_tiny(tiny):
    assert count_parameters(_build(tiny)) < 2e6
    assert tiny.training.micro_batch_size == 8 and tiny.training.precision == "fp32"


# ----------------------------------------------------------------------------------------------
# Conditioning: text masking, text use, low-res use.

@pytest.mark.parametrize("name,attention_type", [("base64-tiny", "fused"), ("base64-tiny", "cross"),
                                                 ("sr256-tiny", "fused"), ("sr1024-tiny", "cross")])
def test_padding_invariance(name, attention_type):
    cfg = load_preset(name)
    net = _randomize(_build(cfg, attention_type=attention_type)).eval()
    args = _inputs(cfg, size=64)
    with torch.no_grad():
        ref = net(**args)
        # Other values at the padding positions: nothing changes.
        junk = dict(args, text_emb=torch.where(args["text_mask"][..., None], args["text_emb"],
                                               torch.randn_like(args["text_emb"]) * 10))
        assert torch.equal(net(**junk), ref)
        # More padding positions: nothing changes either (they are masked, not merely zero).
        extra = 7
        pad_emb = torch.randn(2, extra, cfg.text.embed_dim)
        longer = dict(args, text_emb=torch.cat([args["text_emb"], pad_emb], 1),
                      text_mask=torch.cat([args["text_mask"], torch.zeros(2, extra, dtype=torch.bool)], 1))
        torch.testing.assert_close(net(**longer), ref, rtol=1e-4, atol=1e-5)
        # Fewer padding positions (the longest row keeps all its valid tokens).
        keep = int(args["text_mask"].sum(1).max())
        shorter = dict(args, text_emb=args["text_emb"][:, :keep], text_mask=args["text_mask"][:, :keep])
        torch.testing.assert_close(net(**shorter), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["fused", "cross"])
def test_all_padding_text_is_finite(attention_type):
    cfg = load_preset("base64-tiny")
    net = _randomize(_build(cfg, attention_type=attention_type)).eval()
    args = _inputs(cfg, size=32)
    args["text_mask"][0] = False  # e.g. an empty caption
    args["text_emb"][0] = 0.0     # classifier-free guidance drops the text this way
    with torch.no_grad():
        out = net(**args)
    assert torch.isfinite(out).all()
    # The text of the other row still matters and row 0 is unaffected by it.
    other = dict(args, text_emb=args["text_emb"].clone())
    other["text_emb"][1] += 1.0
    with torch.no_grad():
        out2 = net(**other)
    assert torch.equal(out2[0], out[0]) and not torch.allclose(out2[1], out[1])


def test_base_uses_text_and_noise_level():
    cfg = load_preset("base64-tiny")
    net = _randomize(_build(cfg)).eval()
    args = _inputs(cfg, size=32)
    with torch.no_grad():
        ref = net(**args)
        text = args["text_emb"].clone()
        text[:, 0] += 1.0  # a valid token of every row
        for key, value in {"text_emb": text, "noise_cond": args["noise_cond"] + 0.5}.items():
            diff = (net(**dict(args, **{key: value})) - ref).abs().amax(dim=(1, 2, 3))  # (B,)
            assert diff.min() > 1e-4, f"changing {key} left the output unchanged"


@pytest.mark.parametrize("name", ["sr256-tiny", "sr1024-tiny"])
def test_sr_uses_lowres_and_its_level(name):
    cfg = load_preset(name)
    net = _randomize(_build(cfg)).eval()
    args = _inputs(cfg, size=64)
    with torch.no_grad():
        ref = net(**args)
        changes = {"lowres": args["lowres"] + torch.randn_like(args["lowres"]),
                   "lowres_noise_cond": args["lowres_noise_cond"] + 0.5,
                   "text_emb": args["text_emb"] + 1.0}
        for key, value in changes.items():
            diff = (net(**dict(args, **{key: value})) - ref).abs().amax(dim=(1, 2, 3))
            assert diff.min() > 1e-4, f"changing {key} left the output unchanged"
    with pytest.raises(ValueError, match="lowres"):
        net(**dict(args, lowres=None))


def test_base_refuses_lowres():
    cfg = load_preset("base64-tiny")
    args = _inputs(cfg, size=32)
    with pytest.raises(ValueError, match="low-res"):
        _build(cfg)(**args, lowres=torch.zeros(2, 3, 8, 8), lowres_noise_cond=torch.zeros(2))


def test_sr1024_runs_larger_than_trained():
    cfg = load_preset("sr1024-tiny")
    net = _randomize(_build(cfg)).eval()
    args = _inputs(cfg, batch=1, size=2 * cfg.train_resolution)  # 512 px; low-res 128 px
    with torch.no_grad():
        out = net(**args)
    assert out.shape == (1, 3, 512, 512) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# Precision.

@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.01)])
def test_low_precision_close_to_fp32(dtype, tolerance):
    cfg = load_preset("base64-tiny")
    net = _randomize(_build(cfg)).eval()
    args = _inputs(cfg, batch=1, size=32)  # bf16 convs are slow on CPU: keep it tiny
    with torch.no_grad():
        ref = net(**args)
        low = copy.deepcopy(net).to(dtype)
        # Noise levels stay float32: bf16 cannot resolve them to the 1/1000 the features need.
        out = low(**dict(args, x=args["x"].to(dtype), text_emb=args["text_emb"].to(dtype)))
    assert out.dtype == dtype and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < tolerance, f"{dtype} relative error {rel:.4f}"


# Activation checkpointing is a speed option applied from outside the model: tests/test_speed.py.
# The import rules (no DeepSpeed, torch.distributed, YAML, W&B or webdataset; no files): tests/test_layers.py.
