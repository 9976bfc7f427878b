"""Speed options applied to a network from outside the model code (imagen_train/speedups.py) and
the training config's use of them (imagen_train/training/speed.py): channels_last inputs as the
trainer feeds them, activation checkpointing, the fused GroupNorm -> FiLM -> SiLU mode, cuDNN's
search, and torch.compile, whose every block must really compile (dynamo's counters say so)."""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from imagen_train import speedups
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


def _live(net: torch.nn.Module) -> torch.nn.Module:
    """Re-draw the matrices: the zero-initialised output convs would hide everything."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1)
    return net


def _args(cfg, batch: int = 2, length: int | None = None, seed: int = 0, size: int | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    res, length = size or cfg.train_resolution, length or cfg.text.max_length
    args = [torch.randn(batch, 3, res, res, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, length, cfg.text.embed_dim, generator=gen),
            torch.arange(length)[None] < torch.tensor([[max(1, length // 3)], [length]])[:batch]]
    if cfg.lowres_resolution:
        low = cfg.lowres_resolution
        args += [torch.randn(batch, 3, low, low, generator=gen), torch.rand(batch, generator=gen)]
    return args


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches, counters and limits as a new process has them, before and after."""
    limits = (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = limits


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
    nhwc_net.load_state_dict(_live(plain_net).state_dict())
    args = _args(cfg)
    torch.testing.assert_close(nhwc(*args), plain(*args), rtol=1e-4, atol=1e-4)


def test_check_compile_names_the_setting(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(ConfigError, match=r"training\.compile.*C\+\+ compiler"):
        speed.check_compile("cpu")
    with pytest.raises(ConfigError, match=r"network_call"):  # sampling names its own key
        speedups.check_compile("cpu", key="network_call")


# ----------------------------------------------------------------------------------------------
# Activation checkpointing, applied from outside.

def _grads(net, args):
    net.zero_grad(set_to_none=True)
    net(*args).square().mean().backward()
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def _saved_tensors(net, args) -> int:
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(*args)
    return count


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["base64-tiny", "sr1024-tiny"])
def test_activation_checkpointing_from_outside_keeps_gradients_and_names(preset):
    cfg = load_preset(preset, ["text.max_length=16"])
    plain = _live(build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)).train()
    ckpt = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).train()
    ckpt.load_state_dict(plain.state_dict())
    names = [n for n, _ in ckpt.named_parameters()]
    count = speedups.apply_activation_checkpointing(ckpt)
    assert count == len(speedups.blocks(ckpt)) > 10
    assert [n for n, _ in ckpt.named_parameters()] == names and ckpt.state_dict().keys() == plain.state_dict().keys()
    args = _args(cfg, length=16, size=32)  # small maps: the tiny SR presets train on 256 px
    want, got = _grads(plain, args), _grads(ckpt, args)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    # It really checkpoints: far fewer activations are kept for backward ...
    assert _saved_tensors(ckpt, args) < _saved_tensors(plain, args) / 2
    # ... only in training mode ...
    assert _saved_tensors(ckpt.eval(), args) == _saved_tensors(plain.eval(), args)
    # ... and it comes off again.
    speedups.apply_activation_checkpointing(ckpt.train(), enabled=False)
    assert _saved_tensors(ckpt, args) == _saved_tensors(plain, args)


def test_the_model_code_holds_no_speed_option():
    """A network as built is plain PyTorch: no checkpointing, the composed GroupNorm region; the
    config's options reach it only through training/speed.py."""
    cfg = load_preset("base64-tiny", ["model.activation_checkpointing=true", "training.fused_norm=always",
                                      "training.cudnn_benchmark=false"])
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    regions = [m for m in net.modules() if isinstance(m, (ResBlock, OutputHead))]
    assert all(m.fused_norm_act == "never" for m in regions)
    assert not any("forward" in b.__dict__ for b in speedups.blocks(net))
    before = torch.backends.cudnn.benchmark
    try:
        speed.apply_model_options(net, cfg)
        assert all(m.fused_norm_act == "always" for m in regions)
        assert all(isinstance(b.__dict__.get("forward"), speedups._Checkpointed) for b in speedups.blocks(net))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_apply_fused_norm_is_an_option_of_one_network():
    cfg = load_preset("base64-tiny")
    torch.manual_seed(0)
    fused, composed = (build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution) for _ in range(2))
    regions = [m for m in composed.modules() if isinstance(m, (ResBlock, OutputHead))]
    assert speedups.apply_fused_norm(fused, "auto") == len(regions) > 4
    assert all(m.fused_norm_act == "never" for m in regions)
    with pytest.raises(ValueError, match="unknown fused"):
        speedups.apply_fused_norm(composed, "off")
    # The same values either way; the base64-tiny 64 px maps in channels_last take the fused path.
    calls = {"fused": 0, "composed": 0}
    for name, net in (("fused", fused), ("composed", composed)):
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(
                    name, calls[name] + fused_applies(args[0], mod.norm1, mod.fused_norm_act)))
    composed.load_state_dict(_live(fused).state_dict())
    args = _args(cfg)
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(*args), composed(*args), rtol=1e-4, atol=1e-4)
    assert calls["fused"] > 0 and calls["composed"] == 0


# ----------------------------------------------------------------------------------------------
# torch.compile: every block compiles, once per class and shape.

@pytest.mark.slow
@pytest.mark.parametrize("preset,train", [("base64-tiny", True), ("sr256-tiny", False)])
def test_regional_compile_compiles_every_block_once_per_shape(preset, train, fresh_dynamo):
    """The network's blocks share a few code objects (a class's forward); dynamo's default limit of
    8 graphs per code object would leave the rest eager without a word (base64-tiny has 21 kinds
    of block). Counted by dynamo itself: one graph per (class, shapes), none refused, no break,
    and a new text length adds none (it is dynamic)."""
    cfg = load_preset(preset, ["text.max_length=24"])
    torch.manual_seed(0)
    net = _live(build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)).train(train)
    names = [n for n, _ in net.named_parameters()]
    if train:
        speedups.apply_activation_checkpointing(net)  # applied first, compiled with the block
    args = _args(cfg, length=16)
    with torch.set_grad_enabled(train):
        eager = net(*args)
        eager_grads = _grads(net, args) if train else None
    logged = []
    # The eager backend traces through dynamo without code generation: the same graphs, fast.
    state = speedups.apply_compile(net, "regional", backend="eager", log=logged.append)
    assert state.groups == len({speedups._signature(b) for b in speedups.blocks(net)}) > 8
    assert torch._dynamo.config.recompile_limit >= state.groups
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(net(*args), eager)
        if train:
            for key, grad in _grads(net, args).items():
                torch.testing.assert_close(grad, eager_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    seen = speedups.compile_counters()
    assert seen["unique_graphs"] == state.groups and seen["frames_ok"] >= state.groups
    assert seen["recompile_limit_hits"] == 0 and seen["graph_breaks"] == 0 and state.failed is None
    with torch.set_grad_enabled(train):
        net(*_args(cfg, length=24))  # another text length (training pads to the batch's longest caption)
    assert speedups.compile_counters()["unique_graphs"] == state.groups
    assert [n for n, _ in net.named_parameters()] == names  # checkpoints and the EMA see the same names
    assert len(logged) == 1 and f"{state.groups} distinct shape(s)" in logged[0]
    speedups.remove_compile(state)
    assert all(isinstance(b.__dict__.get("forward"), speedups._Checkpointed) == train for b in speedups.blocks(net))


@pytest.mark.slow
def test_a_compiler_failure_falls_back_to_eager_with_one_line(fresh_dynamo):
    cfg = load_preset("base64-tiny")
    net = _live(build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)).eval()
    args = _args(cfg)
    with torch.no_grad():
        eager = net(*args)

    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    logged = []
    state = speedups.apply_compile(net, "regional", backend=broken, log=logged.append)
    with torch.no_grad():
        torch.testing.assert_close(net(*args), eager)
        torch.testing.assert_close(net(*args), eager)
    assert state.failed is not None and "no working C++ compiler" in state.failed
    failures = [line for line in logged if "failed" in line]
    assert len(failures) == 1 and "running eager" in failures[0]
    assert not speedups.is_compile_error(RuntimeError("CUDA out of memory"))  # a run's own errors are raised


def test_the_inductor_cache_persists_where_the_docs_say(monkeypatch, tmp_path, fresh_dynamo):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert speedups.compile_cache_dir() == str(tmp_path / "xdg" / "imagen_train" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes there itself
    assert speedups.compile_cache_dir() == str(tmp_path / "xdg" / "imagen_train" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert speedups.compile_cache_dir() == str(tmp_path / "mine")
    assert speedups.compile_cache_dir(str(tmp_path / "configured")) == str(tmp_path / "configured")
    net = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    cfg = load_preset("base64-tiny", ["training.compile=true", f"training.compile_cache_dir={tmp_path / 'run'}"])
    state = speed.apply_compile(net, cfg.training, log=lambda line: None)
    assert state.cache_dir == str(tmp_path / "run") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert cache_dir() == str(tmp_path / "run")  # where inductor will read and write its graphs


def test_the_trainer_applies_every_option_through_one_function(monkeypatch):
    cfg = load_preset("base64-tiny", ["training.compile=true", "training.compile_mode=whole",
                                      "model.activation_checkpointing=true"])
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    calls = []
    monkeypatch.setattr(speedups, "apply_compile", lambda module, mode, **kw: calls.append(
        (module, mode, [isinstance(b.__dict__.get("forward"), speedups._Checkpointed) for b in speedups.blocks(module)])))
    speed.apply_speed_options(net, cfg)
    ((module, mode, checkpointed),) = calls
    assert module is net and mode == "whole" and all(checkpointed)  # checkpointing first, then compile
    assert speed.apply_compile(net, load_preset("base64-tiny").training) is None  # off by default
