"""The stage registry: its facts, and that the config, the model builder and the pipeline read it."""

import dataclasses
import typing

import pytest

from imagen_train.config import Config, ModelConfig, load_preset
from imagen_train.evaluation.pipeline_config import (RESOLUTION_STAGES, InferencePipelineConfig, StageCheckpoints,
                                                     StageSamplers)
from imagen_train.models import NETWORKS, build_model
from imagen_train.stages import STAGE_NAMES, STAGES, StageName, get_stage, stages_for


def test_registry_holds_the_cascade():
    assert STAGE_NAMES == ("base64", "sr256", "sr1024")
    rows = {s.name: (s.output_resolution, s.train_resolution, s.lowres_factor, s.kind) for s in STAGES.values()}
    assert rows == {"base64": (64, 64, None, "unet"),
                    "sr256": (256, 256, 4, "efficient_unet"),
                    "sr1024": (1024, 256, 4, "efficient_unet")}
    # Each SR stage upsamples the previous stage's output.
    for before, after in zip(STAGE_NAMES, STAGE_NAMES[1:]):
        assert STAGES[after].input_resolution == STAGES[before].output_resolution
    assert typing.get_args(StageName) == STAGE_NAMES


def test_lookups_refuse_what_is_not_there():
    with pytest.raises(ValueError, match="unknown stage 'sr512'.*base64, sr256, sr1024"):
        get_stage("sr512")
    with pytest.raises(ValueError, match="no stage produces 512 px"):
        stages_for(512)
    assert stages_for(1024) == STAGE_NAMES and stages_for(64) == ("base64",)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_config_reads_the_registry(name, monkeypatch):
    spec = get_stage(name)
    cfg = Config(stage=name, model=ModelConfig(kind=spec.kind))
    assert cfg.train_resolution == spec.train_resolution
    assert cfg.output_resolution == spec.output_resolution
    assert cfg.lowres_resolution == (spec.train_resolution // spec.lowres_factor if spec.lowres_factor else None)
    # A changed registry entry changes what the config derives: there is no second copy.
    changed = dataclasses.replace(spec, train_resolution=32, output_resolution=512)
    monkeypatch.setitem(STAGES, name, changed)
    cfg = Config(stage=name, model=ModelConfig(kind=spec.kind))
    assert (cfg.train_resolution, cfg.output_resolution) == (32, 512)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_tiny_preset_builds_the_registered_network(name):
    spec = get_stage(name)
    cfg = load_preset(spec.tiny_preset)
    assert cfg.stage == name and cfg.model.kind == spec.kind
    net = build_model(cfg.model, cfg.text, cfg.stage, device="meta")
    assert type(net) is NETWORKS[spec.kind]
    wrong = "unet" if spec.kind == "efficient_unet" else "efficient_unet"
    with pytest.raises(ValueError, match=f"stage {name} needs model.kind '{spec.kind}'"):
        build_model(dataclasses.replace(cfg.model, kind=wrong), cfg.text, name, device="meta")


def test_pipeline_config_follows_the_registry():
    for fields in (StageCheckpoints, StageSamplers):
        assert tuple(f.name for f in dataclasses.fields(fields)) == STAGE_NAMES
    assert RESOLUTION_STAGES == {64: ("base64",), 256: ("base64", "sr256"), 1024: STAGE_NAMES}
    hints = typing.get_type_hints(InferencePipelineConfig)
    assert typing.get_args(hints["target_resolution"]) == (64, 256, 1024)
