"""Sampling on a GPU without waiting on it: no device read inside the sampling loop, the inference
precision defaults (bf16 on a GPU, an overflow check for fp16), and the network-call switches
(torch.compile, CUDA graphs: imagen_train/evaluation/cascade.py, imagen_train/speedups.py).

How "no host sync" is tested on a CPU: every operator that makes the host wait for a device value
(`.item()`, `bool(t)`, `float(t)`, `nonzero`, `equal`, ...) goes through `aten._local_scalar_dense`
or another operator with a data-dependent result, which a TorchDispatchMode sees whatever the
device; `Tensor.tolist` is counted by wrapping it. A sampler run may read the device once (its
host copy of the noise levels); the count must not grow with the number of steps, so one read per
step coming back (guidance's interval test on a device tensor was two per call) fails the test.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from imagen_train.config import ConfigError, SamplerConfig, load_preset
from imagen_train.diffusion import NetworkCaller, build_diffusion
from imagen_train.diffusion.guidance import ClassifierFreeGuidance
from imagen_train.diffusion.samplers import SAMPLERS
from imagen_train.evaluation import cascade
from imagen_train.evaluation.cascade import Precision, generate
from imagen_train.evaluation.pipeline_config import load_pipeline_config
from imagen_train.models import build_model
from imagen_train.schema import DiffusionConfig
from imagen_train import speedups

from sampling_helpers import export_tiny
from train_helpers import REPO

PIPELINE = REPO / "configs" / "inference_pipeline.yaml"
# Operators whose result the host needs (a sync on a GPU): scalar reads and data-dependent shapes.
DEVICE_READS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "allclose", "masked_select",
                "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}


class DeviceReads(TorchDispatchMode):
    """Records the operators of DEVICE_READS that run inside it."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in DEVICE_READS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_reads(monkeypatch):
    """count_reads(fn) -> the device reads fn() makes, `Tensor.tolist` included."""
    tolist = torch.Tensor.tolist

    def run(fn) -> list[str]:
        watch = DeviceReads()
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: watch.reads.append("tolist") or tolist(t))
        with watch:
            fn()
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        return watch.reads

    return run


def _net(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
    """A smooth stand-in network with the UNets' signature (dynamic thresholding gets work to do)."""
    return 3 * torch.tanh(x) * (1 + noise_cond[:, None, None, None]) + text_emb.mean(dim=(1, 2))[:, None, None, None]


def _text(batch: int = 2, length: int = 6, dim: int = 8):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, length, dim, generator=gen), torch.arange(length)[None] < torch.tensor([[3], [6]])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_no_sampler_step_reads_the_device(name, count_reads):
    """Guided (inside an interval), dynamically thresholded sampling: the reads of a run do not
    grow with its steps, and are at most the one host copy of the noise levels."""
    emb, mask = _text()
    diffusion = build_diffusion(DiffusionConfig())
    reads = {}
    for steps in (3, 6):
        sampler = SamplerConfig(name=name, steps=steps, guidance_scale=4.0, guidance_interval=[0.5, 20.0],
                                thresholding="dynamic", s_churn=1.0 if name == "edm_stochastic" else 0.0)
        reads[steps] = count_reads(lambda: diffusion.sample(_net, (2, 3, 8, 8), emb, mask, sampler,
                                                            generator=torch.Generator().manual_seed(1)))
    assert reads[3] == reads[6] and len(reads[6]) <= 1, reads


def test_the_read_counter_sees_a_sync_coming_back(count_reads):
    """The counter's sensitivity: guidance deciding its interval on a device tensor (what it did at
    every call before) reads the device; with the sampler's host value it does not."""
    emb, mask = _text()
    guided = ClassifierFreeGuidance(lambda x, sigma, **kw: _net(x, sigma, **kw), 4.0, interval=(0.5, 3.0))
    x = torch.randn(2, 3, 8, 8)
    device_sigma = torch.full((2,), 1.0)
    assert count_reads(lambda: guided(x, device_sigma, text_emb=emb, text_mask=mask))
    host_sigma = torch.full((2,), 1.0)
    host_sigma.host_sigma = 1.0
    assert count_reads(lambda: guided(x, host_sigma, text_emb=emb, text_mask=mask)) == []
    torch.testing.assert_close(guided(x, host_sigma, text_emb=emb, text_mask=mask),
                               guided(x, device_sigma, text_emb=emb, text_mask=mask))
    outside = torch.full((2,), 0.4)
    outside.host_sigma = 0.4
    torch.testing.assert_close(guided(x, outside, text_emb=emb, text_mask=mask),
                               _net(x, outside, text_emb=emb, text_mask=mask))


def test_sampling_the_real_network_reads_the_device_once_per_run(count_reads):
    """base64-tiny through the cascade's caller: the network itself reads nothing either."""
    cfg = load_preset("base64-tiny", ["text.max_length=8", "text.embed_dim=16"])
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).eval().requires_grad_(False)
    caller = NetworkCaller(net, cache_conditioning=True)
    diffusion = build_diffusion(cfg.diffusion)
    emb, mask = torch.randn(1, 8, 16), torch.ones(1, 8, dtype=torch.bool)
    reads = [count_reads(lambda: diffusion.sample(caller, (1, 3, 32, 32), emb, mask, SamplerConfig(
        steps=steps, guidance_scale=3.0, guidance_interval=[0.1, 10.0]))) for steps in (1, 2)]
    assert reads[0] == reads[1] and len(reads[1]) <= 1, reads


# ----------------------------------------------------------------------------------------------
# Inference precision.

def test_auto_precision_is_bf16_on_a_gpu_and_fp32_on_a_cpu(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert Precision("auto", cpu).weight_dtype == torch.float32  # bf16 convolutions are slow on AVX2 CPUs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for trained in ("bf16", "fp32", "fp16"):
        assert Precision("auto", gpu, trained).weight_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert Precision("auto", gpu, "fp16").weight_dtype == torch.float16
    assert Precision("auto", gpu, "bf16").weight_dtype == torch.float32
    assert Precision("bf16", cpu).weight_dtype == Precision("bf16", gpu).weight_dtype == torch.bfloat16
    assert Precision(16, gpu).weight_dtype == torch.float16 and Precision(16, cpu).weight_dtype == torch.bfloat16
    amp = Precision("AMP", gpu)
    assert amp.weight_dtype == torch.float32 and amp.autocast_dtype == torch.float16 and amp.name == "amp_float16"
    assert load_pipeline_config(PIPELINE).inference_precision == "auto"


def test_fp16_overflow_is_refused_with_the_setting_named():
    fp16 = Precision(16, torch.device("cuda"), trained="bf16")
    fp16.check_finite(torch.zeros(2, 3, 4, 4), "base64")
    with pytest.raises(FloatingPointError, match=r"inference_precision=16.*fp16 overflowed.*bf16"):
        fp16.check_finite(torch.tensor([[[[float("inf")]]]]), "base64")


def test_a_stage_with_non_finite_output_stops_the_cascade(tmp_path):
    """The cascade checks each batch's output (its CPU copy: no extra device sync)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = export_tiny("base64", tmp_path / "base64.safetensors", embed_dim=16)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    bias = next(k for k in tensors if k.startswith("ema.out.conv.bias"))
    tensors[bias] = torch.full_like(tensors[bias], float("inf"))
    save_file(tensors, str(path), metadata=metadata)
    cfg = load_pipeline_config(PIPELINE, [f"checkpoints.base64={path}", "target_resolution=64", "batch_size=1",
                                          "num_images_per_prompt=1", "samplers.base64.steps=1", "device=cpu",
                                          "inference_precision=32"])
    emb, mask = torch.randn(1, 128, 16), torch.ones(1, 128, dtype=torch.bool)
    with pytest.raises(FloatingPointError, match=r"stage base64 .*inference_precision=32"):
        generate(cfg, ["a prompt"], text=(emb, mask))


# ----------------------------------------------------------------------------------------------
# How the network is called: eager, torch.compile, CUDA graphs.

def test_network_call_switches_are_checked():
    with pytest.raises(ConfigError, match="network_call"):
        load_pipeline_config(PIPELINE, ["network_call=cuda_graphs", "inference_precision=AMP"])
    with pytest.raises(ConfigError, match="network_call.*CUDA graphs need a GPU"):
        cascade.network_call(torch.nn.Linear(2, 2), "cuda_graphs", torch.device("cpu"))
    net = torch.nn.Linear(2, 2)
    assert cascade.network_call(net, "eager", torch.device("cpu")) is net


@pytest.mark.slow
def test_compiled_network_call_samples_what_eager_does(monkeypatch, tmp_path):
    """network_call=compile goes through the one compile function (speedups.apply_compile, whole
    network); here with dynamo's eager backend, which traces the same graph without inductor."""
    path = export_tiny("base64", tmp_path / "base64.safetensors", embed_dim=16, live=True)
    sets = [f"checkpoints.base64={path}", "target_resolution=64", "batch_size=1", "num_images_per_prompt=1",
            "samplers.base64.steps=2", "device=cpu"]
    emb, mask = torch.randn(1, 128, 16), torch.ones(1, 128, dtype=torch.bool)
    eager = generate(load_pipeline_config(PIPELINE, sets), ["a"], text=(emb, mask)).images
    applied = []
    real = speedups.apply_compile
    monkeypatch.setattr(speedups, "check_compile", lambda *a, **k: None)
    monkeypatch.setattr(speedups, "apply_compile", lambda net, mode, **kw: applied.append(mode) or real(
        net, mode, backend="eager", log=lambda line: None))
    torch._dynamo.reset()
    try:
        compiled = generate(load_pipeline_config(PIPELINE, sets + ["network_call=compile"]), ["a"],
                            text=(emb, mask)).images
    finally:
        torch._dynamo.reset()
    assert applied == ["whole"]
    torch.testing.assert_close(compiled, eager)


def _cpu_capture(fn, static, pool, warmup_calls):
    """A CPU stand-in for CUDA graph capture: replay re-runs fn on the static inputs into the static output."""
    for _ in range(warmup_calls):
        fn(*static)
    output = fn(*static)
    return (lambda: output.copy_(fn(*static))), output


def test_cuda_graph_call_copies_inputs_in_and_the_output_out():
    """The bookkeeping of CUDAGraphCall (the capture itself needs a GPU: pending there): one graph per
    input signature, fresh values copied into its static inputs at every call, optional arguments
    by name, and an output that the next replay cannot overwrite."""
    calls = []

    def net(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        calls.append(x.shape[0])
        out = x * noise_cond[:, None, None, None] + text_emb.sum() * text_mask.sum()
        return out if lowres is None else out + lowres.mean()

    graphed = speedups.CUDAGraphCall(net, warmup_calls=1, capture=_cpu_capture)
    emb, mask = _text()

    def args(batch, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, 4, 4, generator=gen), torch.rand(batch, generator=gen), emb[:batch], mask[:batch]

    first = graphed(*args(2, 0))
    second = graphed(*args(2, 1))
    torch.testing.assert_close(first, net(*args(2, 0)))
    torch.testing.assert_close(second, net(*args(2, 1)))
    assert len(graphed.graphs) == 1 and not torch.equal(first, second)  # the first output was not overwritten
    graphed(*args(1, 2))  # guidance outside its interval: batch B instead of 2B
    low = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(graphed(*args(2, 3), lowres=low), net(*args(2, 3), lowres=low))
    assert len(graphed.graphs) == 3
