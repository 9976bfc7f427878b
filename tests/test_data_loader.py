"""The per-stage training loader: shapes, SR crops, corrupt samples, rank splits, exact resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imagen_train.config import Config, DataConfig, ModelConfig, TextConfig, TrainingConfig
from imagen_train.data import build_train_loader, expand_shards
from imagen_train.data.shards import iter_raw_samples
from imagen_train.data.transforms import StageGeometry, image_pyramid, pad_embeddings, to_unit_range
from test_data_tools import corrupt_shards
from train_helpers import free_port

REPO = Path(__file__).resolve().parent.parent


def make_cfg(shards: str, stage: str = "base64", batch: int = 4, **data) -> Config:
    data = {"num_workers": 0, "shuffle_buffer": 8, **data}
    kind = "unet" if stage == "base64" else "efficient_unet"
    return Config(stage=stage, model=ModelConfig(kind=kind), text=TextConfig(embed_dim=64, max_length=32),
                  data=DataConfig(train_shards=shards, **data),
                  training=TrainingConfig(micro_batch_size=batch, global_batch_size=batch))


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_base_batches_match_the_contract(shards_64):
    fixed = make_cfg(shards_64.pattern)
    fixed.text.pad_to_longest = False
    assert next(iter(build_train_loader(fixed, 0, 1)))["text_emb"].shape == (4, 32, 64)
    loader = build_train_loader(make_cfg(shards_64.pattern), 0, 1)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].min() < -0.5
    # Text padded to the batch's longest caption, rounded up to 8 tokens, kept float16.
    longest = int(batch["text_mask"].sum(1).max())
    length = -(-longest // 8) * 8
    assert batch["text_emb"].shape == (4, length, 64) and batch["text_mask"].shape == (4, length)
    assert batch["text_emb"].dtype == torch.float16 and length <= 32
    assert batch["text_mask"].dtype == torch.bool and "lowres" not in batch
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    lengths = batch["text_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert batch["text_emb"][i, n:].abs().sum() == 0 and batch["text_emb"][i, :n].abs().sum() > 0
    assert next(iter(loader))["key"] != batch["key"]  # iter() continues the stream


def test_shard_specs_list_file_and_pipe(tmp_path, shards_64):
    listing = tmp_path / "train.list"
    listing.write_text("# shards\n" + "\n".join(shards_64.urls) + "\n")
    assert expand_shards(str(listing)) == shards_64.urls
    assert expand_shards(shards_64.pattern) == shards_64.urls
    pipe = f"pipe:cat {shards_64.urls[0]}"
    assert len(list(iter_raw_samples(pipe))) == 8
    loader = build_train_loader(make_cfg(f"{pipe}::{shards_64.urls[1]}", resampled=False, batch=2), 0, 1)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 16 and len(set(keys)) == 16


def test_sr256_and_sr1024_batches(shards_1024):
    loader = build_train_loader(make_cfg(shards_1024.pattern, "sr256", batch=2), 0, 1)
    batch = next(loader)
    assert batch["image"].shape == (2, 3, 256, 256) and batch["lowres"].shape == (2, 3, 64, 64)
    assert batch["text_emb"].shape[::2] == (2, 64) and batch["text_mask"].shape == batch["text_emb"].shape[:2]
    cfg = make_cfg(shards_1024.pattern, "sr1024", batch=2)
    assert cfg.train_resolution == 256 and cfg.lowres_resolution == 64
    batch = next(build_train_loader(cfg, 0, 1))
    assert batch["image"].shape == (2, 3, 256, 256) and batch["lowres"].shape == (2, 3, 64, 64)
    # The low-res image is the same region, downsampled 4x.
    ref = F.interpolate(batch["image"], size=64, mode="bicubic", antialias=True, align_corners=False)
    assert (ref - batch["lowres"]).abs().mean() < 0.02


def test_sr1024_patch_and_lowres_come_from_the_same_region():
    # A smooth random 1024 image, so every patch is unique.
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((1024, 1024), Image.BICUBIC)
    geo = StageGeometry(output_resolution=1024, train_resolution=256, lowres_resolution=64, min_image_size=1024)
    patch, lowres = (to_unit_range(t) for t in image_pyramid(img, geo, random.Random(3)))
    full = to_unit_range(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    hits = [(x, y) for y in range(0, 769, 4) for x in range(0, 769, 4)
            if torch.equal(full[:, y:y + 8, x:x + 8], patch[:, :8, :8])
            and torch.equal(full[:, y:y + 256, x:x + 256], patch)]
    assert len(hits) == 1
    x, y = hits[0]
    full_low = np.array(img.resize((256, 256), Image.BICUBIC, reducing_gap=None))
    low_crop = to_unit_range(torch.from_numpy(full_low[y // 4:y // 4 + 64, x // 4:x // 4 + 64]).permute(2, 0, 1))
    # Equal up to the filter's reach at the patch border (and rounding to uint8).
    assert (low_crop - lowres)[:, 2:-2, 2:-2].abs().max() < 0.03


def test_lowres_blur_widens_the_lowres_edge_and_leaves_the_image_alone():
    """data.lowres_blur_max_px: a drawn 1024 px shape keeps its one-pixel edge in the image; its
    256 px low-res input (bicubic: ~1.5 px from 10 % to 90 %) is blurred by a sigma drawn up to the
    maximum (a rise of 2.56 sigma, in quadrature with the unblurred one)."""
    from data_tools.shape_edges import edge_measures
    from data_tools.synthetic import draw_sample

    img = draw_sample(0, 1, 1024, ("large",))[0]
    sharp = StageGeometry(1024, 1024, 256, 1024)
    blurred = StageGeometry(1024, 1024, 256, 1024, lowres_blur_max_px=3.0)
    image, low = image_pyramid(img, sharp, random.Random(0))
    base = edge_measures(low.permute(1, 2, 0).numpy())["edge_width_px"]
    assert 1.0 < base < 1.7
    widths = []
    for seed in range(3):
        rng = random.Random(seed)
        sigma = random.Random(seed).uniform(0, 3.0)  # the draw image_pyramid makes (no crop: one draw)
        image_b, low_b = image_pyramid(img, blurred, rng)
        assert torch.equal(image_b, image)
        width = edge_measures(low_b.permute(1, 2, 0).numpy())["edge_width_px"]
        expected = float(np.hypot(2.563 * sigma, base))
        assert abs(width - expected) < 0.12 * expected, (seed, sigma, width, expected)
        widths.append(width)
    assert max(widths) > 2 * base


def test_min_image_size_filters_small_images(shards_64):
    loader = build_train_loader(make_cfg(shards_64.pattern, "sr256", batch=2, resampled=False), 0, 1)
    assert list(loader) == []
    assert loader.stats["skipped"] == {"too_small": 48}
    cfg = make_cfg(shards_64.pattern, "sr256", batch=2, resampled=False, min_image_size=32)
    batch = next(build_train_loader(cfg, 0, 1))  # upsampled to 256 when allowed
    assert batch["image"].shape == (2, 3, 256, 256)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, shards_64):
    src = [s for u in shards_64.urls[:2] for s in iter_raw_samples(u)]
    corrupt_shards(src, tmp_path / "bad")
    cfg = make_cfg(str(tmp_path / "bad" / "{00000..00001}.tar"), batch=1, resampled=False)
    loader = build_train_loader(cfg, 0, 1)
    keys = sorted(k.split(":")[1] for b in loader for k in b["key"])
    assert keys == ["good0", "t0", "t1"]
    stats = loader.stats
    assert stats["skipped"] == {"bad_image": 1, "no_caption": 1, "wrong_embed_dim": 1, "bad_shard": 1}
    assert stats["samples"] == 3 and any("badjpeg" in e for e in stats["examples"])


def test_a_missing_embedding_is_skipped(tmp_path, capsys):
    from data_tools.synthetic import write_synthetic

    write_synthetic(tmp_path, 4, shard_size=4, progress_bar=False)
    loader = build_train_loader(make_cfg(str(tmp_path / "00000.tar"), batch=1, resampled=False), 0, 1)
    assert list(loader) == [] and loader.stats["skipped"] == {"no_embedding": 4}


@pytest.mark.parametrize("world_size", [2, 8])
def test_ranks_split_samples_without_overlap(shards_64, world_size):
    # 6 shards: split by shard over 2 ranks, by sample over 8 ranks.
    seen = []
    for rank in range(world_size):
        loader = build_train_loader(make_cfg(shards_64.pattern, batch=1, resampled=False), rank, world_size)
        seen.append({k for b in loader for k in b["key"]})
    assert sum(len(s) for s in seen) == 48 and len(set().union(*seen)) == 48


GLOO_SCRIPT = textwrap.dedent("""
    import json, sys, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_data_loader import make_cfg
    from imagen_train.data import build_train_loader
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = build_train_loader(make_cfg({pattern!r}, batch=2, num_workers=1), rank, world)
    keys = [k for _ in range(6) for k in next(loader)["key"]]
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    if rank == 0:
        json.dump(gathered, open({out!r}, "w"))
    dist.destroy_process_group()
""")


@pytest.mark.multirank
def test_two_rank_gloo_job_sees_distinct_samples(tmp_path, shards_64):
    script = tmp_path / "job.py"
    out = tmp_path / "keys.json"
    script.write_text(GLOO_SCRIPT.format(tests=str(REPO / "tests"), pattern=shards_64.pattern, out=str(out)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    keys0, keys1 = json.loads(out.read_text())
    assert len(keys0) == len(keys1) == 12  # resampled: endless, so shards repeat within a rank
    shards0, shards1 = ({k.split(":")[0] for k in keys} for keys in (keys0, keys1))
    assert not set(keys0) & set(keys1) and not shards0 & shards1


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for name in ("image", "text_emb", "text_mask", "lowres"):
            if name in x:
                assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("num_workers,resampled", [(0, True), (0, False), (2, True)])
def test_exact_resume(shards_64, num_workers, resampled):
    cfg = make_cfg(shards_64.pattern, batch=4, num_workers=num_workers, resampled=resampled,
                   random_crop=True, shuffle_buffer=16, seed=7)
    n = 10 if num_workers else 20  # 5 + 5 with 2 workers: resumes on worker 1. Non-resampled: 48 samples = 12 batches an epoch, so this crosses one

    def straight(loader, count):
        out = []
        while len(out) < count:
            try:
                out.append(next(loader))
            except StopIteration:
                continue  # the next epoch starts on the next call
        return out

    reference = straight(build_train_loader(cfg, 0, 1), n)
    first = build_train_loader(cfg, 0, 1)
    head = straight(first, n // 2)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as a checkpoint stores it
    first.close()
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    tail = straight(resumed, n - n // 2)
    _same_batches(reference, head + tail)
    assert resumed.stats["samples"] == 4 * n
    resumed.close()


def test_resume_refuses_another_layout_which_resplit_continues(shards_64):
    loader = build_train_loader(make_cfg(shards_64.pattern), 0, 1)
    next(loader)
    state = loader.state_dict()
    other = build_train_loader(make_cfg(shards_64.pattern), 0, 2)
    assert other.changes(state) == ["ranks 1 -> 2"]
    with pytest.raises(ValueError, match=r"another layout \(ranks 1 -> 2\).*`resplit`"):
        other.load_state_dict(state)
    assert "re-split for 2 rank(s) x 1 worker(s)" in other.resplit([state])
    assert next(other)["image"].shape == (4, 3, 64, 64)


# Re-split: another layout continues the stream (data/resplit.py) -----------------------------

def _epoch_keys(loader) -> list[str]:
    keys = []
    while True:
        try:
            keys += next(loader)["key"]
        except StopIteration:
            return keys


def _resplit_run(old_cfg, old_world: int, batches: int, new_cfg, new_world: int) -> dict:
    """`batches` per rank on the old layout, then the rest of the epoch re-split on the new one."""
    seen, states = [], []
    for rank in range(old_world):
        loader = build_train_loader(old_cfg, rank, old_world)
        seen += [k for _ in range(batches) for k in next(loader)["key"]]
        states.append(json.loads(json.dumps(loader.state_dict())))  # plain data, as checkpoints hold it
        loader.close()
    after, dropped_at_end, notes, skip = [], 0, [], None
    for rank in range(new_world):
        loader = build_train_loader(new_cfg, rank, new_world)
        notes.append(loader.resplit(states))
        assert skip is None or loader.skip == skip  # every new rank plans the same
        skip = loader.skip
        keys = _epoch_keys(loader)
        after += keys
        dropped_at_end += loader.stats["samples"] - len(keys)  # each worker's last partial batch
        loader.close()
    return {"seen": seen, "after": after, "dropped_at_end": dropped_at_end, "states": states, "notes": notes,
            "skip": skip or set(), "urls": expand_shards(new_cfg.data.train_shards)}


def _check_epoch(run: dict, per_shard: int = 8) -> None:
    """No sample twice in the epoch; the shards left after the re-split are read whole; what is
    lost of the started shards is what the old workers held in their buffers plus the unread
    rest of the shards they had started (shard split), exactly."""
    shard = lambda key: key.split(":")[0]  # noqa: E731
    keys = run["seen"] + run["after"]
    assert len(keys) == len(set(keys)), "a sample was read twice in one epoch"
    started = {os.path.basename(u) for i, u in enumerate(run["urls"]) if i in run["skip"]}
    remaining = [os.path.basename(u) for i, u in enumerate(run["urls"]) if i not in run["skip"]]
    assert {shard(k) for k in run["after"]} <= set(remaining)
    assert len(run["after"]) + run["dropped_at_end"] == per_shard * len(remaining)
    old_names = {shard(k) for k in run["seen"]}
    assert old_names <= started
    workers = [ws for s in run["states"] for ws in s["workers"].values()]
    old = run["states"][0]
    if len(old.get("urls") or run["urls"]) >= old["world_size"] * old["num_workers"]:  # split by shard
        buffered = sum(len(ws["buffer"]["entries"]) for ws in workers if ws["buffer"])
        unread = sum(per_shard - ws["reader"]["in_shard"] for ws in workers
                     if ws["reader"].get("in_shard", 0) > 0 and not ws["done"])
        lost = per_shard * len(started) - len(run["seen"])
        assert lost == buffered + unread, (lost, buffered, unread)
        assert f"dropped for this epoch: {buffered} samples waiting in shuffle buffers" in run["notes"][0]


@pytest.mark.parametrize("old,new,batches", [((2, 1), (1, 2), 3), ((2, 1), (3, 1), 2), ((1, 2), (2, 2), 2),
                                             ((8, 1), (3, 1), 1)])
def test_resplit_within_a_finite_epoch_reads_no_sample_twice(shards_64, old, new, batches):
    """(ranks, workers) before and after. 6 shards of 8: split by shard over up to 6 workers, by
    sample over 8 ranks (every worker reads every shard)."""
    buffer = 0 if old[0] == 8 else 4  # 8 ranks reading a sample in 8: keep some shards unstarted
    old_cfg = make_cfg(shards_64.pattern, batch=2, shuffle_buffer=buffer, resampled=False, num_workers=old[1], seed=5)
    new_cfg = make_cfg(shards_64.pattern, batch=2, shuffle_buffer=4, resampled=False, num_workers=new[1], seed=5)
    run = _resplit_run(old_cfg, old[0], batches, new_cfg, new[0])
    _check_epoch(run)
    assert 0 < len(run["skip"]) < 6 and run["after"]  # the epoch went on, on the shards left
    assert "no sample is read twice this epoch" in run["notes"][0]
    # Deterministic: the same states give the same stream.
    again = _resplit_run(old_cfg, old[0], batches, new_cfg, new[0])
    assert again["after"] == run["after"]


@pytest.mark.parametrize("key", ["num_workers", "shuffle_buffer", "train_shards"])
def test_changing_a_data_key_between_runs_resplits_with_a_notice(shards_64, key):
    """Each of the three keys that made resuming crash or silently lose exactness: the change is
    named, and the stream goes on re-split (finite epoch: nothing read twice)."""
    subset = "::".join(shards_64.urls[:4])
    old_sets = {"num_workers": 1, "shuffle_buffer": 4, "train_shards": subset if key == "train_shards" else shards_64.pattern}
    new_sets = {**old_sets, key: {"num_workers": 2, "shuffle_buffer": 2, "train_shards": shards_64.pattern}[key]}
    old_cfg = make_cfg(old_sets.pop("train_shards"), batch=2, resampled=False, seed=2, **old_sets)
    new_cfg = make_cfg(new_sets.pop("train_shards"), batch=2, resampled=False, seed=2, **new_sets)
    first = build_train_loader(old_cfg, 0, 1)
    next(first)
    name = {"num_workers": "data.num_workers 1 -> 2", "shuffle_buffer": "data.shuffle_buffer 4 -> 2",
            "train_shards": "data.train_shards (another shard list)"}[key]
    assert build_train_loader(new_cfg, 0, 1).changes(first.state_dict()) == [name]
    first.close()
    run = _resplit_run(old_cfg, 1, 2, new_cfg, 1)
    assert f"changed: {name})" in run["notes"][0]
    _check_epoch(run)
    if key == "train_shards":  # the two shards added join the epoch
        assert {"00004.tar", "00005.tar"} <= {k.split(":")[0] for k in run["after"]}


def test_resplit_of_a_resampled_stream_draws_anew(shards_64):
    cfg = make_cfg(shards_64.pattern, batch=2, shuffle_buffer=4, seed=9)
    states = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2)
        take(loader, 3)
        states.append(loader.state_dict())
    keys = []
    for _ in range(2):
        loader = build_train_loader(cfg, 0, 1)
        note = loader.resplit(states)
        keys.append([k for b in take(loader, 6) for k in b["key"]])
    assert keys[0] == keys[1]  # deterministic
    fresh = [k for b in take(build_train_loader(cfg, 0, 1), 6) for k in b["key"]]
    assert keys[0] != fresh  # not the 1-rank stream from its start again
    assert "drawn with replacement, the draws go on from new seeds (re-split 1)" in note
    # Saved and resumed exactly after the re-split, on the same layout.
    state = json.loads(json.dumps(loader.state_dict()))
    tail = take(loader, 3)
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    _same_batches(tail, take(resumed, 3))


def test_text_pads_to_the_longest_caption_or_to_max_length():
    embs = [np.full((n, 4), i + 1, np.float16) for i, n in enumerate([3, 11, 5])]
    emb, mask = pad_embeddings(embs, max_length=32)
    assert emb.shape == (3, 16, 4) and emb.dtype == torch.float16  # 11 -> 16
    assert mask.sum(1).tolist() == [3, 11, 5] and emb[0, 3:].abs().sum() == 0 and emb[1, :11].eq(2).all()
    full, full_mask = pad_embeddings(embs, max_length=32, to_longest=False)
    assert full.shape == (3, 32, 4) and torch.equal(full[:, :16], emb) and full[:, 16:].abs().sum() == 0
    assert torch.equal(full_mask[:, :16], mask) and not full_mask[:, 16:].any()
    capped, _ = pad_embeddings([np.ones((40, 4), np.float16)], max_length=36)
    assert capped.shape == (1, 36, 4)  # never past max_length, even where rounding would

# Resume cost --------------------------------------------------------------------------------

def test_shuffle_buffer_caps_the_wait_and_restores_exactly():
    from imagen_train.data.stream import ShuffleBuffer

    size, n = 16, 400
    buf = ShuffleBuffer(size, (3, 1))
    out, waits = [], []
    for i in range(n):
        got = buf.push((i // 8, i % 8), i)
        if got is not None:
            out.append(got[1])
            waits.append(i - got[1])
        if i == 150:
            state = json.loads(json.dumps(buf.state_dict()))
    out += [s for _, s in buf.drain()]
    assert sorted(out) == list(range(n)) and out != list(range(n))  # a permutation, shuffled
    assert max(waits) == 2 * size  # some hit the cap, none waited longer
    assert 0.05 < sum(w == 2 * size for w in waits) / len(waits) < 0.3  # about e**-2 forced
    # Rebuilt from tags alone (the sample for tag (k, j) is 8k + j here), it continues identically.
    again = ShuffleBuffer(size, (3, 1))
    assert again.restore(state, {(i // 8, i % 8): i for i in range(151)}) == 0
    tail = [again.push((i // 8, i % 8), i) for i in range(151, n)]
    tail = [t[1] for t in tail if t is not None] + [s for _, s in again.drain()]
    assert tail == out[len(out) - len(tail):]


def _counting_reads(monkeypatch) -> dict:
    """Count raw samples and bytes the loader reads from shards (independently of its stats)."""
    from imagen_train.data import loader as loader_module

    seen = {"samples": 0, "bytes": 0}

    def counted(*args, **kwargs):
        for raw in iter_raw_samples(*args, **kwargs):
            seen["samples"] += 1
            seen["bytes"] += sum(len(v) for k, v in raw.items() if not k.startswith("__"))
            yield raw
    monkeypatch.setattr(loader_module, "iter_raw_samples", counted)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 8])
def test_resume_reads_do_not_grow_with_the_step(shards_64, monkeypatch, world_size):
    """Resuming after 10 or after 100 steps reads the same amount, within one shard (8 samples x
    the sample split over ranks), and never more than the buffer's reach plus one shard."""
    size, batch, per_shard = 16, 4, 8
    cfg = make_cfg(shards_64.pattern, batch=batch, shuffle_buffer=size, seed=3)
    stride = 8 if world_size == 8 else 1  # 6 shards < 8 ranks: every rank reads all, keeps 1 in 8
    seen = _counting_reads(monkeypatch)
    reads = {}
    rank = world_size - 1
    for steps in (10, 100):
        reference = take(build_train_loader(cfg, rank, world_size), steps + 3)
        first = build_train_loader(cfg, rank, world_size)
        head = take(first, steps)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build_train_loader(cfg, rank, world_size)
        resumed.load_state_dict(state)
        before = dict(seen)
        tail = take(resumed, 3)
        _same_batches(reference, head + tail)
        # The samples read to rebuild the buffer and reach the position, and bytes likewise.
        reread = resumed.stats["reread_samples"]
        assert resumed.stats["reread_bytes"] > 0
        new = seen["samples"] - before["samples"] - reread  # read for the 3 batches after it
        assert 0 < new <= (3 * batch + 1) * stride + per_shard
        reads[steps] = reread
        assert reread <= (2 * size + 2 * per_shard) * stride, (steps, reread)
    # The old replay read every consumed sample: 10x the steps, 10x the reading.
    assert abs(reads[100] - reads[10]) <= per_shard * stride, reads


@pytest.mark.parametrize("world_size,resampled", [(1, False), (8, True), (8, False)])
def test_resume_at_any_point_is_exact(shards_64, world_size, resampled):
    """Cut while the buffer fills, in steady state, while it drains at the end of an epoch and
    just after; with the shard split (1 rank) and the sample split (8 ranks over 6 shards)."""
    cfg = make_cfg(shards_64.pattern, batch=2, shuffle_buffer=8, seed=11, resampled=resampled)
    rank = world_size // 2
    per_epoch = 48 // world_size // 2

    def straight(loader, count):
        out = []
        while len(out) < count:
            try:
                out.append(next(loader))
            except StopIteration:
                continue
        return out

    n = 2 * per_epoch + 3
    reference = straight(build_train_loader(cfg, rank, world_size), n)
    for cut in sorted({1, 3, per_epoch - 3, per_epoch - 1, per_epoch, per_epoch + 1, n - 2}):
        first = build_train_loader(cfg, rank, world_size)
        head = straight(first, cut)
        resumed = build_train_loader(cfg, rank, world_size)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        _same_batches(reference, head + straight(resumed, n - cut))


def test_an_old_state_version_is_refused_by_name(shards_64):
    loader = build_train_loader(make_cfg(shards_64.pattern), 0, 1)
    next(loader)
    state = {**loader.state_dict(), "version": 1}
    with pytest.raises(ValueError, match="loader state version 1 cannot be continued.*version 2"):
        build_train_loader(make_cfg(shards_64.pattern), 0, 1).load_state_dict(state)


# Preflight: the shards fit the config ---------------------------------------------------------

def _rewrite(shards, folder: Path, change) -> str:
    """A copy of `shards` whose last shard's samples go through `change(entries) -> entries`."""
    from data_tools.common import write_tar_atomic

    folder.mkdir()
    for n, url in enumerate(shards.urls):
        samples = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                   for s in iter_raw_samples(url)]
        if n == len(shards.urls) - 1:
            samples = [(key, change(entries)) for key, entries in samples]
        write_tar_atomic(folder / Path(url).name, samples)
    return str(folder / f"{{00000..{len(shards.urls) - 1:05d}}}.tar")


def _narrow(entries: dict) -> dict:
    from imagen_train.data.schema import encode_embedding, read_embedding

    emb, meta = read_embedding(entries["t5.npy"], entries["t5.json"])
    return {**entries, **encode_embedding(emb[:, :32], max_length=32, encoder="other-t5", truncated=False)}


def _old_schema(entries: dict) -> dict:
    meta = json.loads(entries["t5.json"])
    return {**entries, "t5.json": json.dumps({**meta, "version": 0}).encode()}


def test_preflight_names_the_shard_that_does_not_fit(tmp_path, shards_64):
    from imagen_train.config import ConfigError
    from imagen_train.data.preflight import check_shards, spread

    assert spread(list("abcdefg"), 3) == ["a", "d", "g"] and spread(list("ab"), 5) == ["a", "b"]
    check_shards(make_cfg(shards_64.pattern), shards_64.urls)  # fits
    narrow = _rewrite(shards_64, tmp_path / "narrow", _narrow)
    last = Path(expand_shards(narrow)[-1])
    with pytest.raises(ConfigError, match=rf"text.embed_dim.*64, but {last}:\S+ has width 32 \(encoder other-t5\)"):
        check_shards(make_cfg(narrow), expand_shards(narrow))
    old = _rewrite(shards_64, tmp_path / "old", _old_schema)
    with pytest.raises(ConfigError, match=rf"data.train_shards.*{Path(expand_shards(old)[-1])}:\S+: embedding schema version 0"):
        check_shards(make_cfg(old), expand_shards(old))
    bare = _rewrite(shards_64, tmp_path / "bare", lambda e: {k: v for k, v in e.items() if not k.startswith("t5")})
    with pytest.raises(ConfigError, match=r"precompute-embeddings.*00005.tar:\S+ has no .t5.npy"):
        check_shards(make_cfg(bare), expand_shards(bare))
    # 64 px images for the sr256 stage: refused unless data.min_image_size allows upsampling them.
    with pytest.raises(ConfigError, match=r"data.min_image_size.*at least 256 px.*\(64 px\)"):
        check_shards(make_cfg(shards_64.pattern, "sr256"), shards_64.urls)
    check_shards(make_cfg(shards_64.pattern, "sr256", min_image_size=32), shards_64.urls)
    check_shards(make_cfg(narrow, preflight_shards=0), expand_shards(narrow))  # 0: no check
    # Spread over the list: with 2 of 6 shards checked, the first and the last are among them.
    with pytest.raises(ConfigError, match="has width 32"):
        check_shards(make_cfg(narrow, preflight_shards=2), expand_shards(narrow))


def test_trainer_preflight_runs_the_shard_check(tmp_path, shards_64):
    from imagen_train.config import ConfigError, load_config
    from imagen_train.training.preflight import preflight
    from train_helpers import tiny_overrides

    narrow = _rewrite(shards_64, tmp_path / "narrow", _narrow)
    cfg = load_config(REPO / "configs" / "base64-tiny.yaml", tiny_overrides(tmp_path / "run", narrow, 64))
    with pytest.raises(ConfigError, match="text.embed_dim.*00005.tar"):
        preflight(cfg, 2)
