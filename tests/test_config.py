"""Configs: YAML loading, base files, overrides, round trips and errors that name key and file."""

from pathlib import Path

import pytest
import yaml

from imagen_train.config import (Config, ConfigError, TrainingConfig, configs_dir, from_dict, load_config,
                                 save_config, upgrade_stored)


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_and_derived_resolutions():
    cfg = Config()
    assert cfg.train_resolution == 64 and cfg.lowres_resolution is None
    sr = Config(stage="sr1024", model=Config().model.__class__(kind="efficient_unet"))
    assert sr.train_resolution == 256 and sr.lowres_resolution == 64 and sr.output_resolution == 1024


def test_base_file_and_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", {"optim": {"lr": 1e-3, "weight_decay": 0.0}, "training": {"seed": 5}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "optim": {"lr": 2e-4}})
    cfg = load_config(child, ["training.zero_stage=3", "optim.betas=[0.9, 0.99]", "optim.eps=1e-6"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.optim.weight_decay == 0.0  # from the base file
    assert cfg.training.seed == 5 and cfg.training.zero_stage == 3
    assert cfg.optim.betas == [0.9, 0.99] and cfg.optim.eps == pytest.approx(1e-6)
    assert base.exists()


def test_round_trip(tmp_path):
    cfg = load_config(write(tmp_path / "a.yaml", {"stage": "base64", "model": {"channel_mult": [1, 2]},
                                                 "evaluation": {"prompts": ["a red circle"]}}))
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("data, key, expect", [
    ({"optim": {"lrr": 1e-4}}, "optim.lrr", "unknown key"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "a float"),
    ({"training": {"zero_stage": 4}}, "training.zero_stage", "one of 0, 1, 2, 3"),
    ({"training": {"precision": "fp8"}}, "training.precision", "'bf16'"),
    ({"training": {"micro_batch_size": 3, "global_batch_size": 10}}, "training.global_batch_size", "multiple"),
    ({"model": {"num_res_blocks": [1, 2]}}, "model.num_res_blocks", "list of 4"),
    ({"diffusion": {"noise_aug": {"max_level": 2.0}}}, "diffusion.noise_aug.max_level", "[0, 1]"),
    ({"model": {"dropout": True}}, "model.dropout", "a float"),
    ({"training": {"max_steps": 1.5}}, "training.max_steps", "an int"),
    ({"stage": "sr256"}, "model.kind", "efficient_unet"),
    ({"unknown_section": {}}, "unknown_section", "unknown key"),
])
def test_errors_name_key_and_file(tmp_path, data, key, expect):
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert info.value.key == key
    assert f"'{key}'" in message and str(path) in message and expect in message


def test_override_errors_name_key(tmp_path):
    path = write(tmp_path / "ok.yaml", {})
    with pytest.raises(ConfigError, match="'optim.lr'") as info:
        load_config(path, ["optim.lr=abc"])
    assert "--set" in str(info.value)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="'optim.nope'"):
        load_config(path, ["optim.nope=1"])


def test_base_cycle_and_bad_yaml(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycles"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config(write(tmp_path / "c.yaml", "optim: [unclosed"))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_grad_accum_must_agree_with_ranks():
    t = TrainingConfig(micro_batch_size=4, global_batch_size=32)
    assert t.grad_accum_for(2) == 4
    with pytest.raises(ConfigError, match="training.global_batch_size"):
        t.grad_accum_for(3)
    with pytest.raises(ConfigError, match="training.grad_accum_steps"):
        TrainingConfig(micro_batch_size=4, global_batch_size=32, grad_accum_steps=2).grad_accum_for(2)


def test_every_shipped_config_loads():
    paths = sorted(configs_dir().glob("*.yaml"))
    for path in paths:
        if path.name.startswith("inference"):
            continue
        load_config(path)


def test_speed_options_are_typed_and_off_by_default(tmp_path):
    cfg = load_config(configs_dir() / "base64-tiny.yaml")
    assert cfg.training.channels_last is False and cfg.training.compile is False
    on = load_config(configs_dir() / "base64-tiny.yaml", ["training.channels_last=true", "training.compile=true"])
    assert on.training.channels_last is True and on.training.compile is True
    for key in ("training.channels_last", "training.compile"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*a bool"):
            load_config(configs_dir() / "base64-tiny.yaml", [f"{key}=yes please"])


def test_old_schedule_key_is_refused_with_its_new_name(tmp_path):
    """`schedule:` (the LR schedule) became `lr_schedule:`; an old file must not be half-read."""
    path = write(tmp_path / "old.yaml", {"schedule": {"warmup_steps": 5}})
    with pytest.raises(ConfigError, match=r"config key 'schedule'.*'lr_schedule' instead.*renamed") as info:
        load_config(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match=r"--set.*'schedule'.*'lr_schedule' instead"):
        load_config(write(tmp_path / "ok.yaml", {}), ["schedule.warmup_steps=0"])
    assert load_config(path.with_name("ok.yaml"), ["lr_schedule.warmup_steps=7"]).lr_schedule.warmup_steps == 7
    # The noise schedule keeps its name: diffusion.schedule is not the LR schedule.
    assert load_config(path.with_name("ok.yaml"), ["diffusion.schedule=linear"]).diffusion.schedule == "linear"


def test_configs_stored_before_the_rename_still_load(tmp_path):
    """A checkpoint's config.yaml or an export's metadata from an earlier version reads as before."""
    stored = Config().to_dict()
    stored["schedule"] = stored.pop("lr_schedule")
    stored["schedule"]["warmup_steps"] = 3
    cfg = from_dict(upgrade_stored(stored), Config, "old checkpoint")
    assert cfg.lr_schedule.warmup_steps == 3
    assert upgrade_stored(Config().to_dict()) == Config().to_dict()
    both = dict(Config().to_dict(), schedule={"warmup_steps": 1})
    with pytest.raises(ConfigError, match="'schedule'"):
        from_dict(upgrade_stored(both), Config, "both keys")
