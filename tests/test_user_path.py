"""What a new user met on the way from data to a FID number (issue 27), each fixed and held:
run folders named from the config, resume refusing another network, export of a missing folder,
the documented evaluate command, statistics of another resolution, one pin of torch, the printed
config and its reference, one-line refusals, and where the W&B run is."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from imagen_train import artifacts
from imagen_train.artifacts import checkpoints
from imagen_train.config import ConfigError, LoggingConfig, load_config, load_preset, save_config
from imagen_train.evaluation.fid import FeatureStats, require_fid_stats
from imagen_train.evaluation.pipeline_config import load_pipeline_config
from imagen_train.evaluation.sweep import check_sweep_inputs, sweep_pipeline
from imagen_train.training import trainer as trainer_module
from imagen_train.utils.logging import MetricLogger
from sampling_helpers import export_tiny
from train_helpers import REPO, train_env

README = REPO / "README.md"
PIPELINE = REPO / "configs" / "inference_pipeline.yaml"


def readme_commands(start: str) -> list[list[str]]:
    """The README's command lines (continuations joined) that start with `start`, split as the shell would."""
    text = README.read_text().replace("\\\n", " ")
    return [shlex.split(line) for line in re.findall(rf"^{re.escape(start)}.*$", text, re.M)]


# ----------------------------------------------------------------------------------------------
# run_dir

def test_run_dir_defaults_to_the_config_files_name_and_the_readme_follows(tmp_path):
    assert load_config(REPO / "configs" / "sr256-400m.yaml").run_dir == "runs/sr256-400m"
    (tmp_path / "my-run.yaml").write_text("base: " + str(REPO / "configs" / "base64-tiny.yaml") + "\n")
    assert load_config(tmp_path / "my-run.yaml").run_dir == "runs/my-run"  # the file's name, not its base's
    assert load_config(tmp_path / "my-run.yaml", ["run_dir=elsewhere"]).run_dir == "elsewhere"
    # Every export in the README reads the checkpoints of a run the README's configs name.
    presets = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    exports = readme_commands("python launch/export.py")
    assert exports
    for words in exports:
        run = Path(words[2]).parts
        assert run[0] == "runs" and run[1] in presets and run[2] == "checkpoints", words
    # and the pipeline's default checkpoints are those exports' files
    pipeline = load_pipeline_config(PIPELINE)
    written = {words[words.index("--out") + 1] for words in exports}
    assert {pipeline.checkpoints.base64, pipeline.checkpoints.sr256} <= written


# ----------------------------------------------------------------------------------------------
# Resume refuses a checkpoint of another network, before anything loads.

def _checkpoint_of(cfg, root: Path) -> Path:
    """A complete checkpoint folder as far as the resume checks read it: config, manifest, latest."""
    folder = root / checkpoints.tag_for(4)
    folder.mkdir(parents=True)
    save_config(cfg, folder / checkpoints.CONFIG_FILE)
    checkpoints.write_manifest(folder, 4, 1, {checkpoints.CONFIG_FILE: checkpoints.manifest_entry(
        folder / checkpoints.CONFIG_FILE)})
    checkpoints.point_latest(root, folder.name)
    return folder


class _Loaded(Exception):
    """Raised where the trainer would start loading: the process group."""


def test_resume_refuses_another_network_naming_the_keys_before_anything_loads(tmp_path, monkeypatch, shards_64):
    sets = [f"run_dir={tmp_path / 'run'}", f"data.train_shards={shards_64.pattern}", "text.embed_dim=64"]
    saved = load_preset("base64-tiny", sets)
    _checkpoint_of(saved, tmp_path / "run" / "checkpoints")

    def loading(*args, **kwargs):
        raise _Loaded()

    monkeypatch.setattr(trainer_module, "init_distributed", loading)
    monkeypatch.setattr(trainer_module, "build_model", loading)
    changed = load_preset("base64-tiny", sets + ["model.model_channels=16", "model.num_head_channels=16",
                                                  "diffusion.prediction=v"])
    with pytest.raises(artifacts.CheckpointError) as info:
        trainer_module.Trainer(changed)
    message = str(info.value)
    assert "model.model_channels: 8 in the checkpoint, 16 here" in message
    assert "model.num_head_channels: 32 in the checkpoint, 16 here" in message
    assert "diffusion.prediction: 'eps' in the checkpoint, 'v' here" in message
    assert "model.num_groups" not in message  # only what differs
    # What does not change the weights is no reason to refuse: the trainer goes on to load.
    same = load_preset("base64-tiny", sets + ["model.activation_checkpointing=true", "optim.lr=3e-4"])
    with pytest.raises(_Loaded):
        trainer_module.Trainer(same)


# ----------------------------------------------------------------------------------------------
# Export

def test_export_says_a_missing_folder_does_not_exist(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launch"))
    from export import main  # launch/export.py

    assert main([str(tmp_path / "runs" / "nope" / "checkpoints"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs' / 'nope' / 'checkpoints'} does not exist" in err and "never completed" not in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# The README's evaluate command, and reference statistics of another resolution

def test_the_readme_evaluate_command_needs_only_its_files(tmp_path, monkeypatch, tiny_t5_dir):
    """The README's command, with its files put where it names them, passes every check the sweep
    makes before sampling, samples one image per caption at 256 px (the base and 64 -> 256
    stages only), and the statistics it names are those of 256 px images."""
    (words,) = readme_commands("python launch/evaluate.py")
    # The only substitution: the README's /models/ folder is a folder of this test's.
    sets = [words[i + 1].replace("=/models/", f"={tmp_path}/models/") for i, w in enumerate(words) if w == "--set"]
    config = words[words.index("--config") + 1]
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline_config(REPO / config, sets)
    for stage, seed in (("base64", 0), ("sr256", 1)):
        export_tiny(stage, tmp_path / getattr(cfg.checkpoints, stage), seed=seed)
    Path(cfg.encoder_path).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(tiny_t5_dir, cfg.encoder_path)
    captions = Path(cfg.evaluation.captions_file)
    captions.parent.mkdir(parents=True, exist_ok=True)
    captions.write_text("a red circle\na blue square\na green triangle\n")
    stats = np.zeros(3), np.eye(3)
    FeatureStats(*stats, 10).save(cfg.evaluation.fid_stats_path, resolution="256")
    run = sweep_pipeline(cfg)
    assert run.stages == ("base64", "sr256") and run.num_images_per_prompt == 1
    assert check_sweep_inputs(run) == ["a red circle", "a blue square", "a green triangle"]
    # The same statistics against a 64 px evaluation: refused, naming both sizes.
    with pytest.raises(ConfigError, match=r"statistics of 64 px images.*holds statistics of 256 px images"):
        check_sweep_inputs(sweep_pipeline(load_pipeline_config(REPO / config, sets + ["evaluation.resolution=64"])))
    # Statistics that record no resolution cannot be compared: refused too.
    FeatureStats(*stats, 10).save(tmp_path / "bare.npz")
    with pytest.raises(ConfigError, match="records no image resolution"):
        require_fid_stats(tmp_path / "bare.npz", "evaluation.fid_stats_path", 256)
    # Without the encoder the command says which key before loading anything.
    with pytest.raises(ConfigError, match="encoder_path"):
        check_sweep_inputs(sweep_pipeline(load_pipeline_config(REPO / config, sets + ["encoder_path=null"])))


# ----------------------------------------------------------------------------------------------
# Install

def test_torch_is_pinned_in_constraints_only_and_both_install_commands_use_them():
    requirements = (REPO / "requirements.txt").read_text()
    constraints = (REPO / "constraints.txt").read_text()
    torch_lines = [line for line in requirements.splitlines() if re.match(r"torch\b", line)]
    assert torch_lines and not any("==" in line for line in torch_lines)  # a floor, so a CUDA build satisfies it
    assert re.search(r"^torch==\d", constraints, re.M)
    assert "-c constraints.txt -r requirements.txt" in (REPO / ".ci" / "run").read_text()
    assert "-c constraints.txt -r requirements.txt" in README.read_text()


# ----------------------------------------------------------------------------------------------
# launch/train.py: --print-config, the reference, and refusals said once

def test_print_config_shows_every_default_and_the_deepspeed_config_for_the_ranks(tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "base64-tiny.yaml"),
           "--set", "training.micro_batch_size=2", "--set", "training.global_batch_size=8", "--print-config"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=train_env(WORLD_SIZE="2"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved, ds_config = yaml.safe_load_all(proc.stdout)
    expected = load_config(REPO / "configs" / "base64-tiny.yaml",
                           ["training.micro_batch_size=2", "training.global_batch_size=8"]).to_dict()
    assert resolved == expected and resolved["run_dir"] == "runs/base64-tiny"
    assert resolved["data"]["shuffle_buffer"] == 1000  # a default the YAML never names
    assert ds_config["gradient_accumulation_steps"] == 2  # 8 / (2 x 2 ranks)
    assert ds_config["train_micro_batch_size_per_gpu"] == 2 and ds_config["zero_optimization"]["stage"] == 2
    assert not (tmp_path / "runs").exists()  # printing starts nothing


def test_config_reference_is_generated_from_the_current_schema():
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "config_reference.py"), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (REPO / "docs" / "config-reference.md").read_text()
    for key in ("`run_dir`", "`training.global_batch_size`", "`evaluation.images_per_caption`",
                "`samplers.sr256`", "`logging.wandb_entity`"):
        assert key in text
    # every key has a meaning
    assert not re.findall(r"^\| `[^`]+` \|[^|]*\|[^|]*\|\s*\|$", text, re.M)


@pytest.mark.slow
def test_a_refused_run_says_why_once_without_a_traceback(tmp_path):
    """Two ranks meeting the same config error: rank 0 prints one line, rank 1 nothing, both exit 2."""
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "base64-tiny.yaml"),
           "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.train_shards={tmp_path / 'none' / '0.tar'}",
           "--set", "training.global_batch_size=16"]
    ranks = [subprocess.Popen(cmd, cwd=tmp_path, env=train_env(RANK=str(r), WORLD_SIZE="2"), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2]
    err0, err1 = outputs[0][1], outputs[1][1]
    assert err0.count("[train] refused:") == 1 and "data.train_shards" in err0 and "Traceback" not in err0
    assert "refused" not in err1 and "Traceback" not in err1


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    sys.path.insert(0, str(REPO / "launch"))
    import train as train_script  # launch/train.py

    def broken(argv=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_script, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train_script.run([])


# ----------------------------------------------------------------------------------------------
# W&B

class _FakeRun:
    id, entity, project, url, starting_step = "abc123", "my-team", "imagen", "https://wandb.ai/my-team/imagen/runs/abc123", 0
    dir = "unused"

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def test_wandb_prints_where_the_run_is(tmp_path, monkeypatch, capsys):
    import wandb

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        return _FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    logger = MetricLogger(LoggingConfig(wandb_mode="online", wandb_project="imagen", wandb_entity="my-team"),
                          tmp_path, {})
    logger.close()
    out = capsys.readouterr().out
    assert "[wandb] run abc123 of my-team/imagen: https://wandb.ai/my-team/imagen/runs/abc123" in out
    assert seen["project"] == "imagen" and seen["entity"] == "my-team" and seen["mode"] == "online"
    assert json.loads((tmp_path / "logged.json").read_text())["wandb_id"] == "abc123"
