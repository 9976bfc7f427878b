"""The artifacts layer: checkpoint folders read without DeepSpeed or training code, one resume
refusal, the RNG capture, and periodic evaluation driven through its narrow interface."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagen_train import artifacts
from imagen_train.artifacts import checkpoints
from imagen_train.config import load_preset, save_config
from imagen_train.models import build_model
from imagen_train.utils.rng import preserved_rng, rng_state, set_rng_state

REPO = Path(__file__).resolve().parent.parent


def _loaded_after(code: str) -> dict[str, list[str]]:
    """Run `code` in a fresh interpreter; which deepspeed / imagen_train.training modules it loaded."""
    probe = code + (
        "\nimport json, sys\n"
        "print(json.dumps({p: sorted(m for m in sys.modules if m == p or m.startswith(p + '.'))"
        " for p in ('deepspeed', 'imagen_train.training')}))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fake_checkpoint(root: Path, step: int = 3) -> tuple[dict[str, torch.Tensor], Path]:
    """A complete checkpoint of base64-tiny as 2 ranks write it (EMA slices with uneven bounds,
    as under ZeRO-2; config, manifest, `latest`), written without DeepSpeed. Returns (full EMA,
    folder)."""
    world = 2
    cfg = load_preset("base64-tiny", [])
    torch.manual_seed(1)
    full = {k: v + 0.5 for k, v in build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
            .state_dict().items()}
    folder = root / checkpoints.tag_for(step)
    folder.mkdir(parents=True)
    for rank in range(world):
        layout, shadow = {}, {}
        for name, t in full.items():
            cut = (t.numel() * 2) // 3
            start, end = (0, cut) if rank == 0 else (cut, t.numel())
            layout[name] = {"shape": list(t.shape), "numel": t.numel(), "start": start, "end": end}
            shadow[name] = t.reshape(-1)[start:end].clone()
        checkpoints.write_rank_state(folder, rank, {"step": step, "stage": cfg.stage, "world_size": world,
                                                    "layout": layout, "ema": {"shadow": shadow}})
    save_config(cfg, folder / checkpoints.CONFIG_FILE)
    files = {p.name: checkpoints.manifest_entry(p) for p in folder.iterdir()}
    checkpoints.write_manifest(folder, step, world, files)
    checkpoints.point_latest(root, folder.name)
    return full, folder


@pytest.mark.slow
def test_a_checkpoints_ema_loads_for_inference_without_deepspeed(tmp_path):
    full, folder = _fake_checkpoint(tmp_path / "checkpoints")
    artifacts.verify(folder)
    assert artifacts.find_resume_tag(tmp_path / "checkpoints") == folder.name
    assert artifacts.find_checkpoint(tmp_path / "checkpoints") == folder
    assert artifacts.stage_config(tmp_path / "checkpoints").stage == "base64"
    stitched = artifacts.ema_state_dict(folder)
    assert stitched.keys() == full.keys() and all(torch.equal(stitched[k], full[k]) for k in full)
    # The sampler's loader, from the checkpoints root, in a fresh process: the same weights, and
    # neither DeepSpeed nor the training package is imported.
    out = tmp_path / "loaded.pt"
    loaded = _loaded_after(
        "import torch\nfrom imagen_train.evaluation.cascade import load_stage\n"
        f"net, cfg = load_stage({str(tmp_path / 'checkpoints')!r}, True, torch.device('cpu'), torch.bfloat16)\n"
        "assert not net.training and not any(p.requires_grad for p in net.parameters())\n"
        f"torch.save(net.state_dict(), {str(out)!r})\n")
    assert loaded == {"deepspeed": [], "imagen_train.training": []}
    state = torch.load(out, weights_only=True)
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], full[k].bfloat16()) for k in full)


def test_resume_refusal_is_one_check_from_files_or_rank_state(tmp_path):
    _, folder = _fake_checkpoint(tmp_path / "checkpoints")
    source = artifacts.check_resume_target(folder, "base64", 2, 2)  # the same run: accepted
    assert (source["world_size"], source["zero_stage"], source["reshardable"]) == (2, 2, False)
    with pytest.raises(artifacts.CheckpointError, match="checkpoint of stage base64, this run trains stage sr256"):
        artifacts.check_resume_target(folder, "sr256", 2, 2)
    state = artifacts.read_rank_state(folder, 1)  # what the resume checks again, same words
    with pytest.raises(artifacts.CheckpointError, match="checkpoint of stage base64, this run trains stage sr256"):
        artifacts.refuse_other_run(folder, state["stage"], "sr256")
    # Another world size or ZeRO stage: re-sliced, if the rank files record their optimizer
    # layouts (this fake's, like those of older code, do not).
    for world, zero in ((4, 2), (2, 3)):
        with pytest.raises(artifacts.CheckpointError, match=r"written by 2 ranks at ZeRO stage 2, and its rank "
                           r"files record no optimizer layout.*training.init_from"):
            artifacts.check_resume_target(folder, "base64", world, zero)
    for layout in (None, {"version": 1}):  # None: a run whose optimizer the re-slice does not know
        for rank in range(2):
            state = artifacts.read_rank_state(folder, rank)
            checkpoints.write_rank_state(folder, rank, {**state, "optimizer_layout": layout})
        if layout is None:
            with pytest.raises(artifacts.CheckpointError, match="record no optimizer layout"):
                artifacts.check_resume_target(folder, "base64", 4, 2)
    assert artifacts.check_resume_target(folder, "base64", 4, 3)["reshardable"]
    with pytest.raises(artifacts.CheckpointError, match="'training.offload_optimizer'.*not supported"):
        artifacts.check_resume_target(folder, "base64", 4, 2, offload_optimizer=True)
    (folder / checkpoints.CONFIG_FILE).write_text("stage: [unclosed")
    with pytest.raises(artifacts.CheckpointError, match="config.yaml cannot be read"):
        artifacts.check_resume_target(folder, "base64", 2, 2)


def _draw() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(2).tolist(), np.random.randn(1).tolist(), random.random(),
            random.gauss(0, 1))


def test_rng_state_round_trips_through_a_checkpoint_file_and_preserves_cached_gaussians(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    np.random.randn(1), random.gauss(0, 1)  # each leaves a cached Gaussian behind
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == expected
    # preserved_rng: whatever the body draws, the draws after it are those without it.
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    with preserved_rng():
        _draw(), torch.randn(100), np.random.randn(7), random.gauss(0, 1)
    assert _draw() == expected
    # A state saved before the cached Gaussians were recorded still restores.
    old = {k: v for k, v in torch.load(tmp_path / "rng.pt", weights_only=True).items()
           if k not in ("numpy_gauss", "python_gauss")}
    set_rng_state(old)
    assert torch.rand(3).tolist() == expected[0]


def test_the_last_step_is_evaluated_unless_a_launcher_samples_it_itself(shards_64):
    """evaluation.at_last_step=false: every multiple of eval_every_steps but training.max_steps."""
    from imagen_train.evaluation.periodic import make_periodic_evaluator

    sets = [f"data.eval_shards={shards_64.pattern}", "evaluation.eval_every_steps=2", "training.max_steps=6"]
    default = make_periodic_evaluator(load_preset("base64-tiny", sets))
    assert [s for s in range(1, 7) if default.due(s)] == [2, 4, 6]
    skipping = make_periodic_evaluator(load_preset("base64-tiny", sets + ["evaluation.at_last_step=false"]))
    assert [s for s in range(1, 7) if skipping.due(s)] == [2, 4]
    built = []
    skipping(step=6, materialize_ema=lambda dtype, device: built.append(dtype), device=torch.device("cpu"),
             log=lambda m, step: built.append(m), log_image=lambda *a, **k: built.append(a), out_dir=Path("unused"))
    assert built == []


@pytest.mark.slow
def test_periodic_evaluation_needs_no_trainer(tmp_path, shards_64):
    """The evaluator is driven with the step, a callable that builds the EMA network, a device, log
    functions and a folder; it calls the builder only when a step is due."""
    from imagen_train.evaluation.periodic import make_periodic_evaluator

    cfg = load_preset("base64-tiny", [f"data.eval_shards={shards_64.pattern}", "evaluation.eval_every_steps=2",
                                      f"text.embed_dim={shards_64.embed_dim}", "text.max_length=16",
                                      "evaluation.sampler.steps=2", "evaluation.num_images_per_prompt=1"])
    torch.manual_seed(0)
    built = []

    def materialize_ema(dtype, device):
        built.append((dtype, device))
        return build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).to(device, dtype)

    metrics, images = [], []
    evaluator = make_periodic_evaluator(cfg)
    call = dict(materialize_ema=materialize_ema, device=torch.device("cpu"),
                log=lambda m, step: metrics.append((step, m)),
                log_image=lambda key, path, step, caption="": images.append((key, Path(path), step)),
                out_dir=tmp_path / "samples")
    before = torch.get_rng_state()
    evaluator(step=1, **call)  # not due
    assert metrics == [] and images == [] and built == [] and not (tmp_path / "samples").exists()
    evaluator(step=2, **call)
    assert built == [(torch.float32, torch.device("cpu"))]
    assert images == [("eval/samples", tmp_path / "samples" / "step_2.png", 2)]
    assert images[0][1].is_file()
    assert [step for step, _ in metrics] == [2] and metrics[0][1]["eval/time_s"] > 0
    assert metrics[0][1]["eval/received_bytes"] == 0  # one process: nothing comes from another rank
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG is left as it was
