"""The training-step benchmark (bench/train_step.py) at tiny size: sane numbers, exact FLOP
counts on known layers, and the diffusers peer (skipped where bench requirements are absent)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
    from imagen_train.training.speed import count_flops_per_sample
    forward = count_flops_per_sample(load_config(TINY))
    assert 2.0 * forward < ours["flops_per_sample"] < 3.5 * forward
    assert 0 < ours["mfu"] <= 1
    assert ours["peak_mem_gib"] > ours["state_mem_gib"] > 0


def test_sr_stage_feeds_the_lowres_image(monkeypatch):
    """The SR bench trains on the batch's low-res image: a hook on the network sees that image as
    `lowres` at every call (noise augmentation off, so it arrives all but unchanged), and the
    network's output changes when the image does."""
    batches, nets, seen = [], [], []
    make_batch, make_net = train_step.synthetic_batch, train_step.build_model

    def record_batch(*args, **kwargs):
        batches.append(make_batch(*args, **kwargs))
        return batches[-1]

    def record_lowres(module, args, kwargs):
        seen.append(args[4].detach().clone() if len(args) > 4 else kwargs.get("lowres"))

    def build_and_hook(*args, **kwargs):
        nets.append(make_net(*args, **kwargs))
        nets[-1].register_forward_pre_hook(record_lowres, with_kwargs=True)
        return nets[-1]

    monkeypatch.setattr(train_step, "synthetic_batch", record_batch)
    monkeypatch.setattr(train_step, "build_model", build_and_hook)
    result = train_step.main(["--config", str(REPO / "configs" / "sr256-tiny.yaml"),
                              "--set", "diffusion.noise_aug.max_level=0"] + SMOKE[2:])
    assert result["stage"] == "sr256" and result["models"][0]["flops_per_sample"] > 0
    (batch,), (net,) = batches, nets
    lowres = batch["lowres"]  # (2, 3, 64, 64)
    assert lowres.shape == (2, 3, 64, 64)
    # One call to count FLOPs, one warm-up step, then the timed and settling steps of both rounds.
    assert len(seen) >= 1 + 1 + 2 * 2
    for got in seen:
        assert got is not None and got.shape == lowres.shape
        torch.testing.assert_close(got, lowres, atol=0.01, rtol=0)  # sigma_min's augmentation only
    # The image reaches the output: the trained network answers another low-res image differently.
    net.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 256, 256, generator=gen)
    args = (x, torch.zeros(2), batch["text_emb"].float(), batch["text_mask"])
    with torch.no_grad():
        same = net(*args, lowres, torch.zeros(2))
        other = net(*args, -lowres, torch.zeros(2))
    assert (same - other).abs().max() > 1e-4 * same.abs().max()


def test_peer_is_matched_and_compared(tmp_path):
    pytest.importorskip("diffusers")
    result = train_step.main(SMOKE + ["--peer"])
    ours, peer = result["models"]
    assert abs(peer["params"] / ours["params"] - 1) <= train_step.PEER_TOLERANCE
    assert "SimpleCrossAttnDownBlock2D" in peer["notes"]
    assert len(peer["step_s"]) == len(ours["step_s"]) == 2
    assert peer["flops_per_sample"] > 0 and 0 < peer["mfu"] <= 1
    assert set(result["ratio"]) == {"samples_per_s", "peak_mem", "params"}  # their values: the test below


def test_ours_over_peer_on_a_known_clock(monkeypatch):
    """Steps that take known times and memory give known figures: ours steps in 0.1 s, the peer in
    0.3 s (each round's first, untimed, settling step in 1 s), ours holds 1 GiB and grows 1 GiB
    while stepping, the peer 3 + 1 GiB, and the matmul runs at 1 TFLOP/s. A stand-in for the
    diffusers peer (a second copy of ours) keeps the test free of bench requirements."""
    gib = 2**30
    cost, state, growth = {"ours": 0.1, "peer": 0.3}, {"ours": gib, "peer": 3 * gib}, {"ours": gib, "peer": gib}
    clock, last, settling = [0.0], ["ours"], [False]
    real_step = train_step.Trainable.step

    def step(self, batch):
        last[0] = self.name.split()[0]
        clock[0] += 1.0 if settling[0] else cost[last[0]]
        settling[0] = False
        return real_step(self, batch)

    class Growth:
        def __init__(self, device):
            self.kind, self.bytes = "known", 0

        def __enter__(self):
            settling[0] = True
            return self

        def __exit__(self, *exc):
            self.bytes = growth[last[0]]

    def stand_in(cfg, target_params, dtype, device):
        peer = train_step._ours(cfg, dtype, device)
        peer.name = "peer (stand-in)"
        return peer

    monkeypatch.setattr(train_step, "time", SimpleNamespace(perf_counter=lambda: clock[0], strftime=time.strftime))
    monkeypatch.setattr(train_step, "matmul_seconds", lambda device, dtype, n, reps: [2 * n**3 / 1e12] * reps)
    monkeypatch.setattr(train_step, "PeakGrowth", Growth)
    monkeypatch.setattr(train_step.Trainable, "step", step)
    monkeypatch.setattr(train_step.Trainable, "state_bytes", lambda self: state[self.name.split()[0]])
    monkeypatch.setattr(train_step, "_peer", stand_in)
    result = train_step.main(SMOKE + ["--peer"])  # batch 2; 2 rounds of 1 timed step each
    ours, peer = result["models"]
    assert result["matmul_peak_tflops"] == pytest.approx(1.0)
    assert ours["step_s"] == pytest.approx([0.1, 0.1]) and peer["step_s"] == pytest.approx([0.3, 0.3])
    assert ours["samples_per_s"] == pytest.approx(20) and peer["samples_per_s"] == pytest.approx(20 / 3)
    assert (ours["peak_mem_gib"], peer["peak_mem_gib"]) == pytest.approx((2, 4))
    assert result["ratio"] == pytest.approx({"samples_per_s": 3.0, "peak_mem": 0.5, "params": 1.0})
    assert "ours / peer: samples/s 3.00x, peak memory 0.50x" in train_step.table(result)


@pytest.mark.parametrize("preset", ["base64-500m", "base64-2b"])
def test_peer_of_a_large_preset_builds_and_runs(preset):
    """The matched peer at 500M and 2B: whole heads at every attention layer and a forward that
    runs (on the meta device). A 672-wide level of 64-wide heads once built, then failed in diffusers'
    attention reshape on the GPU."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    import if_peer
    from imagen_train.config import load_preset
    from imagen_train.models import build_model, count_parameters

    cfg = load_preset(preset)
    m = cfg.model
    with torch.device("meta"):
        ours = count_parameters(build_model(m, cfg.text, cfg.stage, cfg.train_resolution))
    kwargs, count = if_peer.match_peer(cfg, ours)
    assert abs(count / ours - 1) <= train_step.PEER_TOLERANCE
    widths = kwargs["block_out_channels"]
    base = widths[0]
    for width, mult in zip(widths, m.channel_mult):  # our multipliers, give or take the rounding
        assert abs(width - base * mult) <= if_peer.MAX_ROUNDING * base * mult
    with torch.device("meta"):
        unet = if_peer.build_peer(kwargs)
    attention = [a for a in unet.modules() if isinstance(a, Attention)]  # the levels and the middle
    assert attention
    for a in attention:
        assert a.inner_dim == a.query_dim and a.heads * m.num_head_channels == a.query_dim
    L, D, res = cfg.text.max_length, cfg.text.embed_dim, cfg.train_resolution
    with torch.device("meta"):
        out = if_peer.peer_forward(unet)(torch.zeros(2, 3, res, res), torch.zeros(2), torch.zeros(2, L, D),
                                         torch.ones(2, L, dtype=torch.bool))
    assert out.shape == (2, m.out_channels, res, res)


@pytest.mark.bench
def test_baselines_train_beside_ours_each_with_its_change(monkeypatch):
    """--baseline (repeatable) trains a copy of our network per baseline in the same rounds: its
    config overrides reach the copy through the trainer's own speed functions, its model option is
    set on it, and its context is entered around its steps only."""
    from imagen_train.models import norm_act

    seen = []  # (the module's mode, whether the fused path was taken) per region
    real = norm_act.fused_applies
    monkeypatch.setattr(norm_act, "fused_applies",
                        lambda x, norm, mode="auto": seen.append((mode, real(x, norm, mode))) or seen[-1][1])
    entered, upcast = [], []
    math = train_step.BASELINES["math-attention"]
    monkeypatch.setitem(train_step.BASELINES, "math-attention",
                        math._replace(context=lambda: _recording(entered, math.context())))
    copy = train_step.BASELINES["groupnorm-fp32-copy"]
    monkeypatch.setitem(train_step.BASELINES, "groupnorm-fp32-copy", copy._replace(
        configure=lambda net: (copy.configure(net), upcast.append(net))))
    names = ["composed-norm", "fused-norm-everywhere", "math-attention", "groupnorm-fp32-copy",
             "set:training.channels_last=false"]
    # sr256-tiny's 256 px maps in channels_last are large enough for the fused path.
    result = train_step.main(["--config", str(REPO / "configs" / "sr256-tiny.yaml"), "--set",
                              "training.channels_last=true"] + SMOKE[2:] + sum((["--baseline", n] for n in names), []))
    models = result["models"]
    labels = [train_step.baseline(n).label for n in names]
    assert [m["name"] for m in models] == ["ours"] + labels and result["baseline"] == names
    assert [s["baseline"] for s in result["speedups"]] == names and [s["label"] for s in result["speedups"]] == labels
    assert len({m["params"] for m in models}) == 1
    ours, *_ = models
    for m in models[1:]:  # the math kernel's backward does not recompute the scores
        assert (m["flops_per_sample"] < ours["flops_per_sample"]) == (m["name"] == labels[2])
    # The flop count, the warm-up step, and per round one settling and one timed step of that copy.
    assert len(entered) == 1 + 1 + 2 * (1 + 1)
    (net,) = upcast
    assert all(getattr(m, "upcast_input", True) for m in net.modules() if type(m).__name__ == "GroupNorm32")
    modes = {mode for mode, _ in seen}
    assert modes == {"auto", "never", "always"}
    auto = [fused for mode, fused in seen if mode == "auto"]
    assert any(auto) and not all(auto)  # ours fuses the 256 px NHWC maps and composes the rest ...
    assert not any(fused for mode, fused in seen if mode == "never")  # ... composed-norm never ...
    assert all(fused for mode, fused in seen if mode == "always")  # ... fused-norm-everywhere always
    with pytest.raises(SystemExit, match="set:KEY=VALUE"):
        train_step.baseline("set:training.compile")


def test_a_cut_run_leaves_the_compile_and_first_step_figures(tmp_path, monkeypatch):
    """--json is written once every network is warm, before the timed rounds."""
    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_step, "timed_steps", cut)
    out = tmp_path / "step.json"
    with pytest.raises(KeyboardInterrupt):
        train_step.main(SMOKE + ["--json", str(out)])
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and partial["batch"] == 2
    (ours,) = partial["prepared"]
    assert ours["name"] == "ours" and ours["first_step_s"] > 0 and ours["compile_mode"] is None


class _recording:
    def __init__(self, log, inner):
        self.log, self.inner = log, inner

    def __enter__(self):
        self.log.append(1)
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


@pytest.mark.parametrize("size", [8, 32])  # the ResBlock composes at 8 px and fuses at 32 px (CPU fp32 NHWC)
def test_norm_act_variants_compute_the_resblock_region(size):
    """bench/norm_act.py times forms of one function: the folded-affine and fused ones must equal the
    eager one (values and gradients), and the eager one must be what ResBlock computes."""
    import norm_act
    from imagen_train.models.layers import ResBlock
    from imagen_train.models.norm_act import fused_applies

    torch.manual_seed(0)
    channels = 64
    h = torch.randn(2, channels, size, size, requires_grad=True)
    weight, bias = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    scale = torch.randn(2, channels, 1, 1, requires_grad=True)
    shift = torch.randn(2, channels, 1, 1, requires_grad=True)
    inputs = (h, weight, bias, scale, shift)
    outs, grads = [], []
    for fn in (norm_act.eager, norm_act.folded, norm_act.fused):
        out = fn(*inputs)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for variant in (1, 2):
        torch.testing.assert_close(outs[variant], outs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads[variant], grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    block = ResBlock(channels, channels, emb_dim=4, num_groups=norm_act.GROUPS).eval()
    seen = {}
    block.conv1.register_forward_hook(lambda m, args, out: seen.__setitem__("conv1_out", out))
    block.conv2.register_forward_pre_hook(lambda m, args: seen.__setitem__("conv2_in", args[0]))
    emb = torch.randn(2, 4)
    x = torch.randn(2, channels, size, size).contiguous(memory_format=torch.channels_last)
    assert fused_applies(x, block.norm1) == (size == 32)
    with torch.no_grad():
        block(x, emb)
        block_scale, block_shift = block.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        expected = norm_act.eager(seen["conv1_out"], block.norm2.weight, block.norm2.bias, block_scale, block_shift)
    torch.testing.assert_close(seen["conv2_in"], expected, rtol=1e-5, atol=1e-5)


def test_profile_step_splits_the_step_and_rates_kernels():
    import profile_step

    # FLOPs from shapes: a stride-2 3x3 conv forward, its backward, a matmul, flash attention.
    assert profile_step.op_flops("aten::mkldnn_convolution", [[2, 4, 16, 16], [8, 4, 3, 3], [8]],
                                 [None, None, None, [1, 1], [2, 2], [1, 1], 1]) == 2 * 2 * 8 * 8 * 8 * 4 * 9
    assert profile_step.op_flops("aten::convolution_backward", [[2, 8, 8, 8], [2, 4, 16, 16], [8, 4, 3, 3]],
                                 []) == 2 * 2 * 2 * 8 * 8 * 8 * 4 * 9
    assert profile_step.op_flops("aten::addmm", [[5], [3, 4], [4, 5]], []) == 2 * 3 * 4 * 5
    assert profile_step.op_flops("aten::_scaled_dot_product_flash_attention_for_cpu",
                                 [[2, 3, 16, 8], [2, 3, 20, 8], [2, 3, 20, 8]], []) == 4 * 2 * 3 * 16 * 20 * 8
    assert profile_step.op_flops("aten::silu", [[2, 3]], []) is None
    assert profile_step.kind_of("aten::silu_backward") == "elementwise"
    assert profile_step.kind_of("aten::_fused_adamw_") == "optimizer"

    result = profile_step.main(["--config", TINY, "--batch", "2", "--steps", "1", "--threads", "1", "--top", "5"])
    assert result["name"] == "ours"
    assert sum(result["by_kind"].values()) == pytest.approx(result["total_ms"])
    assert result["by_kind"]["convolution"] > 0 and result["by_kind"]["attention"] > 0
    convs = [g for g in result["groups"] if g["op"] == "aten::mkldnn_convolution"]
    assert convs and all(g["calls"] >= 1 and g["gflops_per_s"] > 0 for g in convs)


def test_unmasked_attention_baseline_drops_the_mask_and_restores_sdpa():
    from imagen_train.models.attention import attend
    q, k, v = torch.randn(3, 2, 5, 8).unbind(0)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    masked = attend(q, k, v, heads=2, mask=mask)
    with train_step.BASELINES["unmasked-attention"].context():
        unmasked = attend(q, k, v, heads=2, mask=mask)
    torch.testing.assert_close(unmasked, attend(q, k, v, heads=2))
    assert not torch.allclose(unmasked[0], masked[0])  # row 0 had padding: now attended
    torch.testing.assert_close(attend(q, k, v, heads=2, mask=mask), masked)  # restored on exit


@pytest.mark.bench
def test_sampling_bench_runs_the_cascade_and_tabulates_it(tmp_path):
    """bench/sampling.py end to end at tiny size: per run the encoder and every stage up to the
    largest column, and a table with a cell per column."""
    import sampling

    out = tmp_path / "sampling.json"
    result = sampling.main(["--presets", "tiny", "--precisions", "32", "--batch-sizes", "1", "--steps", "1",
                            "--resolutions", "64", "256", "--threads", "1", "--work-dir", str(tmp_path / "work"),
                            "--out", str(out)])
    assert json.loads(out.read_text())["table"] == result["table"]
    (run,) = result["runs"]
    assert run["status"] == "ok"
    stages = {s["stage"]: s for s in run["stages"]}
    assert list(stages) == ["text_encoder", "base64", "sr256"]  # nothing past the largest column
    for name in ("base64", "sr256"):
        s = stages[name]
        assert s["load_s"] > 0 and s["first_batch_s"] > 0 and s["steady_images"] == 1 and s["steady_s"] > 0
    assert sampling.column(run, 64)["first_image_s"] < sampling.column(run, 256)["first_image_s"]
    assert "| 32 first image s |" in result["table"] and "256 b1" in result["table"]
    assert "1024" not in result["table"].splitlines()[2]


def test_sampling_bench_times_each_part_on_a_known_clock(tmp_path, monkeypatch, tiny_t5_dir):
    """One bench run (in process) on a clock that only the work moves: loading the encoder takes
    100 s, loading a stage 10 s and each network call 1 s. The figures must put each second where
    it belongs: loading and the first batch in time to first image, the second batch alone in the
    steady state, and one network call in each 1000 ms per call."""
    import sampling

    from imagen_train.evaluation import cascade

    clock, calls = [0.0], {}
    real_load, real_encoder = cascade.load_stage, cascade.load_text_encoder

    def tick(seconds):
        clock[0] += seconds

    def load_stage(path, *args, **kwargs):
        net, cfg = real_load(path, *args, **kwargs)
        tick(10)
        calls[cfg.stage] = []

        def call(module, args):
            tick(1)
            calls[cfg.stage].append(1)

        net.register_forward_pre_hook(call)
        return net, cfg

    def load_text_encoder(*args, **kwargs):
        tick(100)
        return real_encoder(*args, **kwargs)

    monkeypatch.setattr(cascade, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(cascade, "load_stage", load_stage)
    monkeypatch.setattr(cascade, "load_text_encoder", load_text_encoder)
    exports = {s: str(sampling.export_random(sampling.PRESETS["tiny"][s], tmp_path / f"{s}.safetensors", 64,
                                             torch.device("cpu"))) for s in ("base64", "sr256")}
    rows = sampling.worker({"precision": "32", "network_call": "eager", "batch": 1, "batches": 2, "steps": 2,
                            "resolution": 256, "guidance": 3.0, "exports": exports, "encoder": str(tiny_t5_dir),
                            "device": "cpu", "out": str(tmp_path / "out"), "threads": 1})
    stages = {r["stage"]: r for r in rows}
    assert stages["text_encoder"]["first_image_s"] == 100
    for name in ("base64", "sr256"):
        s, per_batch = stages[name], len(calls[name]) // 2  # two batches of one image, alike
        assert per_batch >= 2 and len(calls[name]) == 2 * per_batch
        assert (s["load_s"], s["first_batch_s"], s["first_image_s"]) == (10, per_batch, 10 + per_batch)
        assert (s["steady_images"], s["steady_s"], s["steady_images_per_s"]) == (1, per_batch, 1 / per_batch)
        assert s["ms_per_call"] == 1000
    run = {"status": "ok", "stages": rows}
    first = {n: 10 + len(calls[n]) // 2 for n in calls}
    assert sampling.column(run, 64)["first_image_s"] == 100 + first["base64"]
    assert sampling.column(run, 256)["first_image_s"] == 100 + first["base64"] + first["sr256"]


def test_a_sampling_column_adds_its_stages_in_series():
    """Known stage figures, known column: the encoder and the stages up to the column one after
    another (times add, one image per s then one per s is one per 2 s), memory the largest."""
    import sampling

    def stage(name, mem, first, rate):
        return {"stage": name, "peak_mem_gib": mem, "first_image_s": first, "steady_images_per_s": rate}

    run = {"status": "ok", "stages": [stage("text_encoder", 5.0, 1.0, 0.0), stage("base64", 2.0, 2.0, 1.0),
                                      stage("sr256", 3.0, 4.0, 1.0), stage("sr1024", 7.0, 8.0, 0.5)]}
    assert sampling.column(run, 64) == {"peak_mem_gib": 5.0, "first_image_s": 3.0, "images_per_s": 1.0}
    assert sampling.column(run, 256) == {"peak_mem_gib": 5.0, "first_image_s": 7.0, "images_per_s": 0.5}
    assert sampling.column(run, 1024) == {"peak_mem_gib": 7.0, "first_image_s": 15.0, "images_per_s": 0.25}
    one_batch = {"status": "ok", "stages": [dict(s, steady_images_per_s=0.0) for s in run["stages"]]}
    assert sampling.column(one_batch, 256)["images_per_s"] == 0.0  # no steady state measured: none claimed
    assert sampling.column({"status": "stopped: over the budget"}, 64) is None


def test_sampling_bench_keeps_to_its_budget(tmp_path, monkeypatch):
    """A run that overruns is stopped and marked; runs that would start too late are not started."""
    import subprocess

    import sampling

    started, waited = [], [0.0]

    def overrun(cmd, **kwargs):  # the worker runs until its timeout, on the bench's clock
        started.append(kwargs["timeout"])
        waited[0] += kwargs["timeout"]
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(sampling.subprocess, "run", overrun)
    monkeypatch.setattr(sampling, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + waited[0],
                                                          strftime=time.strftime))
    result = sampling.main(["--presets", "tiny", "--precisions", "32", "16", "--batch-sizes", "1", "--steps", "1",
                            "--resolutions", "64", "--budget-s", "600", "--min-run-s", "590",
                            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "s.json")])
    first, second = result["runs"]
    assert len(started) == 1 and 590 <= started[0] <= 600  # the worker got what was left of the budget
    assert first["status"].startswith("stopped") and second["status"].startswith("not run")
    assert "| 32 GiB | stopped |" in result["table"] and "| 16 GiB | not run |" in result["table"]


@pytest.mark.bench
def test_load_stage_bench_times_every_way_of_loading(tmp_path):
    import load_stage

    result = load_stage.main(["--preset", "sr256-tiny", "--export", str(tmp_path / "sr256.safetensors"), "--old",
                              "--threads", "1", "--json", str(tmp_path / "load.json")])
    assert result["export_written_s"] > 0 and result["export_bytes"] > 0
    steps = result["steps"]
    assert list(steps) == ["build", "meta_build", "meta_load", "old_load"]
    assert len({s["params"] for s in steps.values()}) == 1 and all(s["seconds"] > 0 for s in steps.values())
    assert steps["meta_build"]["touch_s"] is None and steps["meta_load"]["touch_s"] > 0
    assert json.loads((tmp_path / "load.json").read_text())["steps"] == steps


def test_memory_format_bench_reports_medians_and_their_ratio_on_a_known_clock(monkeypatch):
    """bench/sampling_memory_format.py: the formats alternate; each call's time is read off the
    clock, and the ratio is of the medians (here 3 s contiguous, 2 s channels_last: 1.5)."""
    import sampling_memory_format as bench

    ticks = iter([t for rep in range(3) for t in (10 * rep, 10 * rep + 3, 10 * rep + 3, 10 * rep + 5)])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    row = bench.measure("base64", batch=1, reps=3)
    assert row["resolution"] == 64 and row["batch"] == 1
    assert row["seconds_per_call"] == {"contiguous": 3, "channels_last": 2}
    assert row["contiguous_over_channels_last"] == 1.5
    with pytest.raises(StopIteration):
        next(ticks)  # exactly two clock reads per timed call, none for the untimed first calls
