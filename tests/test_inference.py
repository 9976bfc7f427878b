"""Inference plumbing: networks built on the meta device take the file's tensors as their weights
(models.assign_weights, artifacts.load_exported, evaluation.cascade.load_stage), and the
cascade's network caller casts the conditioning once per run (evaluation.cascade.Precision.caller)."""

from __future__ import annotations

import pytest
import torch

from imagen_train.evaluation.cascade import Precision, load_stage

from sampling_helpers import export_tiny


def _stage_inputs(cfg, generator: torch.Generator) -> dict:
    """Random network inputs for a stage at its training size (some text padding)."""
    res, L, D = cfg.output_resolution, cfg.text.max_length, cfg.text.embed_dim
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, L // 2:] = False
    inputs = {"x": torch.randn(2, 3, res, res, generator=generator), "noise_cond": torch.randn(2, generator=generator),
              "text_emb": torch.randn(2, L, D, generator=generator), "text_mask": mask}
    if cfg.stage != "base64":
        low = cfg.lowres_resolution
        inputs.update(lowres=torch.randn(2, 3, low, low, generator=generator),
                      lowres_noise_cond=torch.rand(2, generator=generator))
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base64", "sr256"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_built_stage_equals_a_normally_built_one(stage, dtype, tmp_path):
    """Inference builds on the meta device and takes the file's tensors as its weights: the same
    outputs, to the bit, as a network built with its usual initialisation and then loaded, and
    nothing (no parameter, no buffer) left on the meta device."""
    from safetensors.torch import load_file

    from imagen_train.models import build_model
    from imagen_train.artifacts import exported_config

    path = export_tiny(stage, tmp_path / f"{stage}.safetensors", seed=3, live=True)
    cfg = exported_config(path)
    reference = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    reference.load_state_dict({k[len("ema."):]: v for k, v in load_file(str(path)).items()}, strict=True)
    reference = reference.to(dtype).eval().requires_grad_(False)

    net, _ = load_stage(str(path), True, torch.device("cpu"), dtype)
    tensors = dict(net.named_parameters()) | dict(net.named_buffers())
    reference_tensors = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert tensors.keys() == reference_tensors.keys()
    assert not any(t.is_meta for t in tensors.values())
    assert all(t.dtype == dtype and not t.requires_grad for t in net.parameters())
    assert not net.training
    inputs = _stage_inputs(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = net(**inputs), reference(**inputs)
    assert out.abs().sum() > 0  # live weights: the output depends on every layer
    assert torch.equal(out, expected)


def test_an_export_missing_weights_is_refused_naming_file_and_keys(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from imagen_train.models import WeightsMismatchError
    from imagen_train.artifacts import CONFIG_KEY, load_exported

    full = export_tiny("sr256", tmp_path / "full.safetensors")
    tensors = load_file(str(full))
    dropped = sorted(k for k in tensors if k.startswith("ema.") and k.endswith(".film.weight"))[:2]
    for key in dropped:
        del tensors[key]
    tensors["ema.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    with safe_open(str(full), framework="pt") as f:
        save_file(tensors, str(broken), metadata={CONFIG_KEY: f.metadata()[CONFIG_KEY]})
    with pytest.raises(WeightsMismatchError) as err:
        load_stage(str(broken), True, torch.device("cpu"), torch.float32)
    message = str(err.value)
    assert str(broken) in message and "2 missing" in message and "extra.weight" in message
    assert all(key[len("ema."):] in message for key in dropped)
    # A tensor of the wrong shape is refused too, naming the file.
    tensors = load_file(str(full))
    tensors[dropped[0]] = torch.zeros(3)
    with safe_open(str(full), framework="pt") as f:
        save_file(tensors, str(broken), metadata={CONFIG_KEY: f.metadata()[CONFIG_KEY]})
    with pytest.raises(WeightsMismatchError, match=str(broken)):
        load_exported(broken)


def test_assign_weights_refuses_what_a_meta_build_would_leave_unset():
    """A buffer outside the state dict (non-persistent) keeps no value when the network is built
    on the meta device: assign_weights names it instead of returning a network that holds it."""
    from imagen_train.models import assign_weights

    class WithTable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    state = WithTable().state_dict()
    assert set(state) == {"linear.weight", "linear.bias"}
    with torch.device("meta"):
        net = WithTable()
    with pytest.raises(RuntimeError, match="table"):
        assign_weights(net, state, "a test state")
    built = assign_weights(WithTable(), state, "a test state")  # built normally, the buffer is set
    assert torch.equal(built.table, torch.arange(4.0)) and torch.equal(built.linear.weight, state["linear.weight"])


@pytest.mark.slow
def test_cascade_caller_casts_the_conditioning_once_per_run(tmp_path):
    """Mode 16 (bf16 weights on a CPU): the network gets the text and low-res image in its dtype,
    the same cast tensors at every call while the sampler passes the same ones, fresh casts for
    new ones, and the output equals casting at every call."""
    from imagen_train.diffusion import build_diffusion
    from imagen_train.config import SamplerConfig

    path = export_tiny("sr256", tmp_path / "sr256.safetensors", live=True)
    net, cfg = load_stage(str(path), True, torch.device("cpu"), torch.bfloat16)
    seen = []
    forward = net.forward

    def spy(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        seen.append((x, text_emb, lowres))
        return forward(x, noise_cond, text_emb, text_mask, lowres, lowres_noise_cond)

    net.forward = spy
    precision = Precision(16, torch.device("cpu"))
    caller = precision.caller(net)
    inputs = _stage_inputs(cfg, torch.Generator().manual_seed(0))
    sampler = SamplerConfig(name="edm_heun", steps=2, guidance_scale=3.0, thresholding="none")
    diffusion = build_diffusion(cfg.diffusion)

    def sample(call):
        return diffusion.sample(call, (2, 3, 256, 256), inputs["text_emb"], inputs["text_mask"], sampler,
                                lowres=inputs["lowres"], generator=torch.Generator().manual_seed(1)).images

    images = sample(caller)
    assert len(seen) == 3
    assert all(t.dtype == torch.bfloat16 for call in seen for t in call)
    assert all(call[1] is seen[0][1] and call[2] is seen[0][2] for call in seen)
    assert torch.equal(images, sample(lambda *args, **kw: precision.caller(net)(*args, **kw)))
    assert seen[3][1] is not seen[0][1] and torch.equal(seen[3][1], seen[0][1])  # new caller, new casts
