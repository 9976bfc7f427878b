"""EMA stitching from per-rank slices: recorded bounds, older checkpoints' equal parts, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from imagen_train import artifacts
from imagen_train.artifacts import CheckpointError, ema_slices_for, ema_state_dict, stitch
from imagen_train.training import checkpoint as ckpt
from imagen_train.artifacts import export_checkpoint
from train_helpers import run_training, tiny_overrides


def test_stitch_places_slices_at_their_bounds():
    full = torch.arange(10.0)
    # ZeRO-2-like bounds: one rank holds 0..7, the next 7..10, a third none.
    pieces = [(7, 10, full[7:]), (0, 0, torch.zeros(0)), (0, 7, full[:7])]
    assert torch.equal(stitch("w", 10, pieces), full)
    with pytest.raises(CheckpointError, match="'w' do not tile it: a gap or overlap at element 6"):
        stitch("w", 10, [(0, 6, full[:6]), (7, 10, full[7:])])
    with pytest.raises(CheckpointError, match="cover 7 of its 10"):
        stitch("w", 10, [(0, 7, full[:7])])


def write_rank_files(folder: Path, states: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rank, state in enumerate(states):
        torch.save(state, folder / f"trainer_state_rank{rank:05d}.pt")


def test_old_equal_part_layout_still_exports_and_recuts(tmp_path):
    """A checkpoint from before the bounds were recorded: ZeRO-3 style, equal parts of
    ceil(numel / world), the last rank's slice padded."""
    torch.manual_seed(0)
    full = {"a": torch.randn(3, 3), "b": torch.randn(4)}
    layout = {n: {"shape": list(t.shape), "numel": t.numel()} for n, t in full.items()}
    states = []
    for rank in range(2):
        shadow = {}
        for n, t in full.items():
            part = -(-t.numel() // 2)
            piece = t.reshape(-1)[rank * part:(rank + 1) * part]
            shadow[n] = torch.cat([piece, torch.zeros(part - piece.numel())])  # padded
        states.append({"world_size": 2, "layout": layout, "ema": {"shadow": shadow}})
    write_rank_files(tmp_path / "ck", states)
    out = ema_state_dict(tmp_path / "ck")
    assert out.keys() == full.keys() and all(torch.equal(out[n], full[n]) for n in full)
    # Re-cut for a rank whose new bounds differ (as ZeRO-2's do): a[2:9], b nothing.
    new = {"a": {**layout["a"], "start": 2, "end": 9}, "b": {**layout["b"], "start": 0, "end": 0}}
    cut = ema_slices_for(tmp_path / "ck", new)
    assert torch.equal(cut["a"], full["a"].reshape(-1)[2:9]) and cut["b"].numel() == 0


def to_old_layout(folder: Path) -> None:
    """Rewrite a checkpoint's rank files as the code before recorded bounds wrote them (equal
    parts, no 'start'/'end'), and its manifest to match."""
    full = ema_state_dict(folder)
    files = sorted(folder.glob("trainer_state_rank*.pt"))
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    for rank, path in enumerate(files):
        state = torch.load(path, weights_only=True)
        world = state["world_size"]
        state["layout"] = {n: {"shape": e["shape"], "numel": e["numel"]} for n, e in state["layout"].items()}
        for n, t in full.items():
            part = -(-t.numel() // world)
            state["ema"]["shadow"][n] = t.reshape(-1)[rank * part:(rank + 1) * part].clone()
        torch.save(state, path)
        manifest["files"][path.name] = {"size": path.stat().st_size, "sha256": artifacts.file_sha256(path)}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_old_layout_checkpoint_resumes_like_a_new_one(tmp_path, shards_64):
    """ZeRO-2, fp32 (where the old slices of the module's weights were the masters' values): a
    step-2 checkpoint rewritten in the old layout resumes to the same step-4 EMA."""
    straight, old = tmp_path / "straight", tmp_path / "old"
    sets = dict(zero_stage=2, **{"checkpoint.every_steps": 2, "ema.decay": 0.5})
    run_training("base64-tiny.yaml", tiny_overrides(straight, shards_64.pattern, shards_64.embed_dim,
                                                    max_steps=4, **sets))
    tag = ckpt.tag_for(2)
    shutil.copytree(straight / "checkpoints" / tag, old / "checkpoints" / tag)
    (old / "checkpoints" / ckpt.LATEST).write_text(tag + "\n")
    to_old_layout(old / "checkpoints" / tag)
    artifacts.verify(old / "checkpoints" / tag)
    proc = run_training("base64-tiny.yaml", tiny_overrides(old, shards_64.pattern, shards_64.embed_dim,
                                                           max_steps=4, **sets))
    assert "resumed from" in proc.stdout + proc.stderr
    a = ema_state_dict(straight / "checkpoints" / ckpt.tag_for(4))
    b = ema_state_dict(old / "checkpoints" / ckpt.tag_for(4))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # The resumed run wrote the new layout (bounds recorded), which exports as before.
    state = torch.load(next((old / "checkpoints" / ckpt.tag_for(4)).glob("trainer_state_rank*.pt")),
                       weights_only=True)
    assert all("start" in e for e in state["layout"].values())
    export_checkpoint(old / "checkpoints" / ckpt.tag_for(4), tmp_path / "old.safetensors")
