"""Speed options (imagen_train/training/speed.py): channels_last inputs as the trainer feeds them
(through `network_caller`), the fused GroupNorm -> FiLM -> SiLU option, and the torch.compile check."""

from __future__ import annotations

import pytest
import torch

from imagen_train.config import ConfigError, load_preset
from imagen_train.diffusion import NetworkCaller
from imagen_train.models import build_model
from imagen_train.models.layers import OutputHead, ResBlock
from imagen_train.models.norm_act import fused_applies
from imagen_train.training import speed


def _trainer_caller(channels_last: bool):
    """The caller the trainer builds (speed.network_caller) around a tiny network."""
    cfg = load_preset("base64-tiny", [f"training.channels_last={str(channels_last).lower()}"])
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    return cfg, net, speed.network_caller(net, cfg.training, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True])
def test_trainer_feeds_the_network_in_the_configured_memory_format(channels_last):
    cfg, net, caller = _trainer_caller(channels_last)
    assert isinstance(caller, NetworkCaller) and caller.net is net and caller.dtype == torch.float32
    seen = {}
    net.input.register_forward_hook(lambda m, args, out: seen.update(x=args[0], h=out))
    L = cfg.text.max_length
    out = caller(torch.randn(2, 3, 64, 64), torch.zeros(2), torch.randn(2, L, cfg.text.embed_dim),
                 torch.ones(2, L, dtype=torch.bool))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 64, 64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # The image arrives in the configured format and the first activation follows it...
    assert seen["x"].is_contiguous(memory_format=fmt) and seen["h"].is_contiguous(memory_format=fmt)
    # ... while the weights stay contiguous (DeepSpeed cannot broadcast channels_last parameters).
    assert net.input.weight.is_contiguous()


def test_trainer_caller_takes_the_training_dtype():
    cfg, net, _ = _trainer_caller(False)
    caller = speed.network_caller(net.bfloat16(), cfg.training, torch.bfloat16)
    seen = {}
    net.input.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    L = cfg.text.max_length
    out = caller(torch.randn(2, 3, 64, 64), torch.zeros(2), torch.randn(2, L, cfg.text.embed_dim),
                 torch.ones(2, L, dtype=torch.bool))
    assert seen["x"].dtype == torch.bfloat16 and out.dtype == torch.float32


def test_channels_last_gives_the_same_output():
    cfg, plain_net, plain = _trainer_caller(False)
    _, nhwc_net, nhwc = _trainer_caller(True)
    with torch.no_grad():  # re-draw the matrices: the zero-initialised output conv would hide everything
        for p in plain_net.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1)
    nhwc_net.load_state_dict(plain_net.state_dict())
    L, D = cfg.text.max_length, cfg.text.embed_dim
    args = (torch.randn(2, 3, 64, 64), torch.rand(2), torch.randn(2, L, D), torch.ones(2, L, dtype=torch.bool))
    torch.testing.assert_close(nhwc(*args), plain(*args), rtol=1e-4, atol=1e-4)


def test_check_compile_names_the_setting(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(ConfigError, match=r"training\.compile.*C\+\+ compiler"):
        speed.check_compile("cpu")


@pytest.mark.parametrize("preset", ["base64-tiny", "sr256-tiny"])
def test_regional_compile_compiles_each_block_and_keeps_outputs_and_names(preset):
    cfg = load_preset(preset)
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).eval()
    names = [n for n, _ in net.named_parameters()]
    b, res, length = 2, cfg.train_resolution, cfg.text.max_length
    args = [torch.randn(b, 3, res, res), torch.rand(b), torch.randn(b, length, cfg.text.embed_dim),
            torch.arange(length)[None] < torch.tensor([[5], [length]])]
    if cfg.lowres_resolution:
        args += [torch.randn(b, 3, cfg.lowres_resolution, cfg.lowres_resolution), torch.rand(b)]
    with torch.no_grad():
        eager = net(*args)
    # The eager backend traces through dynamo without code generation: the same regions, fast.
    count = speed.compile_regions(net, backend="eager")
    compiled = [m for m in net.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert count == len(compiled) > 10
    assert {type(m).__name__ for m in compiled} >= {"ResBlock"}
    assert net._compiled_call_impl is None  # the regions, not the whole network
    with torch.no_grad():
        torch.testing.assert_close(net(*args), eager)
    assert [n for n, _ in net.named_parameters()] == names  # checkpoints and the EMA see the same names


def test_set_fused_norm_act_is_an_option_of_one_network():
    cfg = load_preset("base64-tiny")
    torch.manual_seed(0)
    fused, composed = (build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution) for _ in range(2))
    composed.load_state_dict(fused.state_dict())
    regions = [m for m in composed.modules() if isinstance(m, (ResBlock, OutputHead))]
    assert speed.set_fused_norm_act(composed, "never") == len(regions) > 4
    assert all(m.fused_norm_act == "never" for m in regions)
    assert all(m.fused_norm_act == "auto" for m in fused.modules() if isinstance(m, (ResBlock, OutputHead)))
    with pytest.raises(ValueError, match="unknown fused"):
        speed.set_fused_norm_act(composed, "off")
    # The same values either way; the base64-tiny 64 px maps in channels_last take the fused path.
    calls = {"fused": 0, "composed": 0}
    for name, net in (("fused", fused), ("composed", composed)):
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(
                    name, calls[name] + fused_applies(args[0], mod.norm1, mod.fused_norm_act)))
    L, D = cfg.text.max_length, cfg.text.embed_dim
    args = (torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last), torch.rand(2),
            torch.randn(2, L, D), torch.ones(2, L, dtype=torch.bool))
    with torch.no_grad():
        for p in fused.parameters():  # the zero-initialised output convs would hide everything
            if p.dim() > 1:
                p.normal_(std=0.1)
        composed.load_state_dict(fused.state_dict())
        torch.testing.assert_close(fused(*args), composed(*args), rtol=1e-4, atol=1e-4)
    assert calls["fused"] > 0 and calls["composed"] == 0
