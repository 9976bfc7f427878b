"""The data CLI: make-shards, synthetic, precompute-embeddings, inspect, verify (real files)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.__main__ import main
from data_tools.synthetic import COLOURS, BACKGROUNDS, draw_sample
from imagen_train.data.schema import EMBED_KEY, EMBED_META_KEY, encode_embedding, read_embedding
from imagen_train.data.shards import iter_raw_samples

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv: str) -> tuple[int, dict]:
    """Run `python -m data_tools` in-process; (exit status, JSON summary)."""
    code = main([*argv, "--no-progress"] if argv[0] != "--help" else list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out[out.index("{\n"):])


def read_all(folder: Path) -> list[dict]:
    return [s for p in sorted(folder.glob("*.tar")) for s in iter_raw_samples(str(p))]


def _images(folder: Path, n: int = 5) -> list[tuple[Path, bytes, str]]:
    """n small images (JPEG and PNG) with captions in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        img = Image.fromarray(np.random.default_rng(i).integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8))
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        path = folder / f"img{i}.{ext}"
        img.save(path, format=fmt)
        items.append((path, path.read_bytes(), f"caption number {i}"))
    return items


def test_make_shards_from_folder_keeps_every_key(tmp_path, capsys):
    items = _images(tmp_path / "in")
    for path, _, cap in items[:-1]:  # the last image has no sidecar caption
        path.with_suffix(".txt").write_text(cap)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "in" / "broken.txt").write_text("a caption")
    code, summary = run_cli(capsys, "make-shards", "--input", str(tmp_path / "in"), "--out",
                            str(tmp_path / "out"), "--shard-size", "3")
    assert code == 0 and summary["samples"] == 4 and summary["shards"] == 2
    assert summary["skipped"] == {"no_caption": 1, "bad_image": 1}
    assert any("broken.jpg" in name for name in summary["skipped_samples"]["bad_image"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) == ["00000.tar", "00001.tar"]
    samples = read_all(tmp_path / "out")
    by_path = {json.loads(s["json"])["original_path"]: s for s in samples}
    for path, data, cap in items[:-1]:
        s = by_path[str(path)]
        ext = "jpg" if path.suffix == ".jpg" else "png"
        assert s[ext] == data and s["txt"].decode() == cap  # image bytes kept as they are
        meta = json.loads(s["json"])
        assert meta["caption"] == cap and meta["key"] == s["__key__"]
        assert (meta["width"], meta["height"]) == Image.open(path).size


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_make_shards_from_manifest_with_min_size_and_reencode(tmp_path, capsys, kind):
    items = _images(tmp_path / "imgs")
    rows = [{"image": f"imgs/{p.name}", "caption": cap} for p, _, cap in items]
    manifest = tmp_path / f"m.{kind}"
    if kind == "csv":
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption"])
            w.writeheader()
            w.writerows(rows)
    else:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, summary = run_cli(capsys, "make-shards", "--manifest", str(manifest), "--out", str(tmp_path / "out"),
                            "--min-size", "56", "--reencode", "jpg")
    # heights are 40, 48, 56, 64, 72 (width 48): only min side >= 56 pass -> none (width 48)
    assert summary["skipped"] == {"too_small": 5} and summary["samples"] == 0
    code, summary = run_cli(capsys, "make-shards", "--manifest", str(manifest), "--out", str(tmp_path / "out2"),
                            "--min-size", "48", "--reencode", "jpg")
    assert summary["samples"] == 4 and summary["skipped"] == {"too_small": 1}
    samples = read_all(tmp_path / "out2")
    assert all(set(s) >= {"jpg", "txt", "json"} and "png" not in s for s in samples)
    assert [s["txt"].decode() for s in samples] == [cap for _, _, cap in items[1:]]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit, match="pyarrow"):
        main(["make-shards", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "o")])


def test_synthetic_is_deterministic_and_captions_match_pixels(tmp_path, capsys):
    args = ["--num-samples", "30", "--resolution", "96", "--shard-size", "8", "--holdout", "0.2"]
    run_cli(capsys, "synthetic", "--out", str(tmp_path / "a"), *args)
    code, summary = run_cli(capsys, "synthetic", "--out", str(tmp_path / "b"), *args)
    assert summary["num_samples"] == 24 and summary["holdout_samples"] == 6
    for sub in ("", "holdout"):
        a = sorted((tmp_path / "a" / sub).glob("*.tar"))
        assert a and [p.read_bytes() for p in a] == [p.read_bytes() for p in sorted((tmp_path / "b" / sub).glob("*.tar"))]
    other = draw_sample(1, 0, 96)[1:]
    assert any(draw_sample(0, i, 96)[1:] != other for i in range(3))  # the seed matters
    samples = read_all(tmp_path / "a") + read_all(tmp_path / "a" / "holdout")
    assert len(samples) == 30 and len({s["txt"] for s in samples}) > 10
    for s in samples:
        caption, meta = s["txt"].decode(), json.loads(s["json"])
        img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        assert img.shape == (96, 96, 3)
        words = caption.split()
        colour = next(w for w in words if w in COLOURS)
        background = next(w for w in words if w in BACKGROUNDS)
        cx, cy = (int(v) for v in meta["center"])
        assert tuple(img[cy, cx]) == COLOURS[colour], caption
        # The corner farthest from the shape shows the background named in the caption.
        fx, fy = (0 if cx > 48 else 95), (0 if cy > 48 else 95)
        assert tuple(img[fy, fx]) == BACKGROUNDS[background], caption
        assert meta["shape"] in caption and meta["size"] in caption and meta["position"] in caption


def _direct_embedding(t5_dir: Path, caption: str) -> np.ndarray:
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(t5_dir), local_files_only=True)
    model = T5EncoderModel.from_pretrained(str(t5_dir), local_files_only=True).eval()
    ids = tok([caption], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state[0].numpy()


def test_precompute_resumes_and_matches_direct_encoder(tmp_path, capsys, tiny_t5_dir):
    run_cli(capsys, "synthetic", "--out", str(tmp_path / "raw"), "--num-samples", "12", "--shard-size", "4")
    args = ["precompute-embeddings", "--shards", str(tmp_path / "raw" / "{00000..00002}.tar"),
            "--encoder", str(tiny_t5_dir), "--out", str(tmp_path / "emb"), "--batch-size", "3"]
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "00001.tar.tmp-999").write_bytes(b"half a shard")  # a crashed run's leftover
    code, first = run_cli(capsys, *args)
    assert code == 0 and first["shards_written"] == 3 and first["samples_written"] == 12
    assert first["embed_dim"] == 64 and first["skipped"] == {}
    code, second = run_cli(capsys, *args)
    assert second["shards_written"] == 0 and second["shards_skipped_existing"] == 3
    raw, emb = read_all(tmp_path / "raw"), read_all(tmp_path / "emb")
    assert len(emb) == 12
    for r, e in zip(raw, emb):
        assert all(e[k] == r[k] for k in ("png", "txt", "json"))  # every input key intact
        arr, meta = read_embedding(e[EMBED_KEY], e[EMBED_META_KEY])
        assert arr.dtype == np.float16 and meta["n_tokens"] == arr.shape[0] and meta["version"] == 1
        assert e[EMBED_KEY][:6] == b"\x93NUMPY"  # a plain .npy, no pickle
    for e in emb[:3]:
        direct = _direct_embedding(tiny_t5_dir, e["txt"].decode())
        arr, _ = read_embedding(e[EMBED_KEY], e[EMBED_META_KEY])
        assert arr.shape == direct.shape  # valid tokens only, EOS included
        np.testing.assert_allclose(arr.astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_precompute_splits_shards_by_rank_from_env(tmp_path, capsys, monkeypatch, tiny_t5_dir):
    run_cli(capsys, "synthetic", "--out", str(tmp_path / "raw"), "--num-samples", "12", "--shard-size", "4")
    shards = str(tmp_path / "raw" / "{00000..00002}.tar")
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        _, summary = run_cli(capsys, "precompute-embeddings", "--shards", shards, "--encoder", str(tiny_t5_dir),
                             "--out", str(tmp_path / "emb"))
        written.append(summary["shards_written"])
    assert written == [2, 1] and len(list((tmp_path / "emb").glob("*.tar"))) == 3


def corrupt_shards(src: list[dict], folder: Path) -> None:
    """Shard 00000: good, corrupt JPEG, no caption, wrong-width embedding; 00001: truncated."""
    from data_tools.common import write_tar_atomic

    folder.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in s.items() if not k.startswith("__")} for s in src]
    bad_jpeg = {**{k: v for k, v in clean[1].items() if k != "png"}, "jpg": b"\xff\xd8\xff\xe0garbage"}
    no_caption = {k: v for k, v in clean[2].items() if k != "txt"}
    wrong_width = {**clean[3], **encode_embedding(np.ones((5, 32), np.float32), max_length=128,
                                                  encoder="x", truncated=False)}
    write_tar_atomic(folder / "00000.tar", [("good0", clean[0]), ("badjpeg", bad_jpeg),
                                            ("nocaption", no_caption), ("wrongwidth", wrong_width)])
    write_tar_atomic(folder / "full.tar", [(f"t{i}", clean[4 + i]) for i in range(3)])
    data = (folder / "full.tar").read_bytes()
    with tarfile.open(folder / "full.tar") as tar:  # cut inside the 3rd sample's data
        third = next(m for m in tar.getmembers() if m.name.startswith("t2."))
    (folder / "00001.tar").write_bytes(data[: third.offset_data + 10])
    (folder / "full.tar").unlink()


def test_verify_names_bad_samples_and_inspect_counts(tmp_path, capsys, shards_64):
    src = [s for u in shards_64.urls[:2] for s in iter_raw_samples(u)]
    corrupt_shards(src, tmp_path / "bad")
    pattern = str(tmp_path / "bad" / "{00000..00001}.tar")
    code, summary = run_cli(capsys, "verify", "--shards", pattern, "--embed-dim", "64")
    assert code == 1 and not summary["ok"]
    problems = {b["sample"].rsplit(":", 1)[-1]: b["problem"] for b in summary["bad"]}
    assert "decode" in problems["badjpeg"] and problems["nocaption"] == "no caption"
    assert "width 32" in problems["wrongwidth"] and "good0" not in problems
    assert any("truncated" in p for p in problems.values())
    code, good = run_cli(capsys, "verify", "--shards", shards_64.pattern, "--require-embeddings")
    assert code == 0 and good["ok"] and good["samples"] == 48 and good["embedding_widths"] == {"64": 48}
    code, info = run_cli(capsys, "inspect", "--shards", shards_64.pattern)
    assert info["samples"] == 48 and info["shards"] == 6 and info["keys"]["t5.npy"] == 48
    assert info["embedding_dtypes"] == {"float16": 48} and info["caption_words"]["min"] >= 8


def test_precompute_skips_and_names_bad_samples(tmp_path, capsys, shards_64, tiny_t5_dir):
    src = [s for u in shards_64.urls[:2] for s in iter_raw_samples(u)]
    corrupt_shards(src, tmp_path / "bad")
    code, summary = run_cli(capsys, "precompute-embeddings", "--shards", str(tmp_path / "bad" / "{00000..00001}.tar"),
                            "--encoder", str(tiny_t5_dir), "--out", str(tmp_path / "emb"), "--read-retries", "0")
    # 00000.tar: bad samples skipped and named; 00001.tar is cut short: no output, exit 1, named.
    assert code == 1 and not summary["ok"] and summary["shards_written"] == 1
    assert summary["skipped"] == {"bad_image": 1, "no_caption": 1}
    assert summary["skipped_samples"]["bad_image"][0].endswith(":badjpeg")
    assert summary["samples_written"] == 2  # good0, wrongwidth (re-embedded)
    assert [f["shard"] for f in summary["failed_shards"]] == [str(tmp_path / "bad" / "00001.tar")]
    assert "truncated" in summary["failed_shards"][0]["problem"]
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["00000.tar", "00000.tar.json"]
    record = json.loads((tmp_path / "emb" / "00000.tar.json").read_text())
    assert record["input_samples"] == 4 and record["output_samples"] == 2
    assert record["skipped_keys"] == {"bad_image": ["badjpeg"], "no_caption": ["nocaption"]}


def _raw_shards(capsys, folder: Path, n_shards: int = 3, per_shard: int = 2) -> str:
    run_cli(capsys, "synthetic", "--out", str(folder), "--num-samples", str(n_shards * per_shard),
            "--shard-size", str(per_shard))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def test_precompute_makes_no_output_for_a_missing_shard_and_a_rerun_retries_it(tmp_path, capsys, tiny_t5_dir):
    """Issue 27: a missing input shard once became an empty output shard, exit 0, and was never
    retried. Now: no output, exit 1 naming it; once it is back, a rerun writes exactly it."""
    pattern = _raw_shards(capsys, tmp_path / "raw")
    held = tmp_path / "raw" / "00001.tar.away"
    (tmp_path / "raw" / "00001.tar").rename(held)
    args = ["precompute-embeddings", "--shards", pattern, "--encoder", str(tiny_t5_dir),
            "--out", str(tmp_path / "emb"), "--read-retries", "0"]
    code = main([*args, "--no-progress"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out[captured.out.index("{\n"):])
    assert code == 1 and not summary["ok"] and summary["shards_written"] == 2
    assert "raw/00001.tar could not be read" in captured.err
    assert summary["failed_shards"][0]["shard"].endswith("raw/00001.tar")
    assert not (tmp_path / "emb" / "00001.tar").exists()
    # verify against the inputs fails while the shard is missing
    code, check = run_cli(capsys, "verify", "--shards", str(tmp_path / "emb" / "{00000..00002}.tar"),
                          "--inputs", pattern)
    assert code == 1 and any("00001.tar" in b["sample"] for b in check["bad"])
    held.rename(tmp_path / "raw" / "00001.tar")
    code, rerun = run_cli(capsys, *args)
    assert code == 0 and rerun["ok"] and rerun["shards_written"] == 1 and rerun["shards_skipped_existing"] == 2
    assert rerun["samples_written"] == 2
    code, check = run_cli(capsys, "verify", "--shards", str(tmp_path / "emb" / "{00000..00002}.tar"),
                          "--inputs", pattern, "--require-embeddings")
    assert code == 0 and check["ok"] and check["samples"] == 6 and check["inputs_checked"] == 3


def test_verify_fails_on_an_empty_shard_a_count_off_its_record_and_a_shortfall(tmp_path, capsys, tiny_t5_dir):
    """What the old precompute left behind (an empty output shard) and a shard that lost samples
    after it was written are both caught, with and without the inputs."""
    from data_tools.common import write_tar_atomic

    pattern = _raw_shards(capsys, tmp_path / "raw")
    out = tmp_path / "emb"
    code, _ = run_cli(capsys, "precompute-embeddings", "--shards", pattern, "--encoder", str(tiny_t5_dir),
                      "--out", str(out))
    assert code == 0
    outputs = str(out / "{00000..00002}.tar")
    write_tar_atomic(out / "00001.tar", [])  # the old bug's 10 KiB empty tar
    one = list(iter_raw_samples(str(out / "00002.tar")))[:1]
    write_tar_atomic(out / "00002.tar", [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                                        for s in one])  # a sample lost after writing
    code, plain = run_cli(capsys, "verify", "--shards", outputs)
    problems = {b["sample"].rsplit("/", 1)[-1]: b["problem"] for b in plain["bad"]}
    assert code == 1 and problems["00001.tar"] == "shard holds no samples"
    assert "holds 1 samples, its record 00002.tar.json says 2" in problems["00002.tar"]
    (out / "00002.tar.json").unlink()  # without a record, only the inputs can tell
    code, against = run_cli(capsys, "verify", "--shards", outputs, "--inputs", pattern)
    problems = {b["sample"].rsplit("/", 1)[-1]: b["problem"] for b in against["bad"]}
    assert code == 1 and "no precompute record" in problems["00002.tar"]
    record = json.loads((out / "00000.tar.json").read_text())
    (out / "00002.tar.json").write_text(json.dumps({**record, "input": "raw/00002.tar"}))
    code, against = run_cli(capsys, "verify", "--shards", outputs, "--inputs", pattern)
    problems = {b["sample"].rsplit("/", 1)[-1]: b["problem"] for b in against["bad"]}
    assert code == 1 and problems["00002.tar"].startswith("shortfall: 1 samples; input")


def test_cli_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "data_tools", "precompute-embeddings", "--help"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--max-length" in out and "default: 128" in out


def test_synthetic_exclude_leaves_phrases_out_of_training_only(tmp_path):
    import tarfile

    from data_tools.synthetic import write_synthetic

    summary = write_synthetic(tmp_path / "s", 200, resolution=64, shard_size=100, holdout=0.25,
                              progress_bar=False, exclude=("red square", "blue circle at the top left"))
    assert summary["num_samples"] == 150 and summary["holdout_samples"] == 50
    assert summary["skipped_for_exclude"] > 0

    def captions(folder):
        out = []
        for shard in sorted(folder.glob("*.tar")):
            with tarfile.open(shard) as tar:
                out += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
        return out

    train = captions(tmp_path / "s")
    assert len(train) == 150
    assert not any("red square" in c or "blue circle at the top left" in c for c in train)
    assert any("red" in c for c in train) and any("square" in c for c in train)
    held = captions(tmp_path / "s" / "holdout")
    assert len(held) == 50


def test_synthetic_drop_attributes_shortens_training_captions_only(tmp_path):
    import json
    import tarfile

    from data_tools.synthetic import draw_sample, parse_caption, write_synthetic

    for i in range(40):
        full_image, full_caption, _ = draw_sample(0, i, 64, ("large",))
        image, caption, meta = draw_sample(0, i, 64, ("large",), drop_attributes=0.3)
        assert np.array_equal(np.asarray(image), np.asarray(full_image))  # the image does not change
        assert meta["full_caption"] == full_caption
        words = caption.split()
        assert (meta["colour"] in words) == ("colour" in meta["named"])
        assert (meta["shape"] in words) == ("shape" in meta["named"]) != ("shape" in words)
        assert (meta["position"] in caption) == ("position" in meta["named"])
        assert (f"{meta['background']} background" in caption) == ("background" in meta["named"])
    named = [len(draw_sample(0, i, 64, ("large",), drop_attributes=0.3)[2]["named"]) for i in range(400)]
    assert 0.6 < sum(named) / (4 * len(named)) < 0.8  # each attribute named with probability 0.7

    summary = write_synthetic(tmp_path / "s", 240, resolution=64, shard_size=100, holdout=0.25, progress_bar=False,
                              exclude=("red square in the center",), sizes=("large",), drop_attributes=0.5)
    assert summary["drop_attributes"] == 0.5

    def samples(folder):
        out = []
        for shard in sorted(folder.glob("*.tar")):
            with tarfile.open(shard) as tar:
                out += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        return out

    train, held = samples(tmp_path / "s"), samples(tmp_path / "s" / "holdout")
    # An excluded combination stays out even when its caption would not name it.
    assert not any(m["colour"] == "red" and m["shape"] == "square" and m["position"] == "in the center"
                   for m in train)
    assert any(len(m["named"]) < 4 for m in train)
    assert all(m["caption"] == m["full_caption"] and parse_caption(m["caption"]) for m in held)
    with pytest.raises(ValueError, match="drop_attributes"):
        write_synthetic(tmp_path / "bad", 4, drop_attributes=1.0, progress_bar=False)


def test_synthetic_sizes_narrows_the_drawn_sizes_and_rejects_unknown_names(tmp_path, capsys):
    from data_tools.synthetic import draw_sample

    metas = [draw_sample(0, i, 64, ("large",))[2] for i in range(30)]
    assert {m["size"] for m in metas} == {"large"}
    assert all(draw_sample(0, i, 64, ("large",))[1].startswith("a large ") for i in range(30))
    # The default still draws both sizes, with the same images as before for a given index.
    assert {draw_sample(0, i, 64)[2]["size"] for i in range(30)} == {"small", "large"}
    code, summary = run_cli(capsys, "synthetic", "--out", str(tmp_path / "l"), "--num-samples", "6",
                            "--sizes", "large", "--no-progress")
    assert code == 0 and summary["sizes"] == ["large"]
    from data_tools.synthetic import write_synthetic

    with pytest.raises(ValueError, match="huge"):
        write_synthetic(tmp_path / "bad", 6, progress_bar=False, sizes=("huge",))
    assert not list(tmp_path.glob("bad/*.tar"))  # nothing written


def test_read_shape_recovers_what_was_drawn_even_through_noise():
    """`read_shape` inverts `draw_sample` (every kind, colour, position, background and size)."""
    from data_tools.synthetic import read_shape

    rng = np.random.default_rng(0)
    for resolution in (64, 256):
        for i in range(120):
            img, caption, meta = draw_sample(5, i, resolution)
            clean = np.asarray(img)
            noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
            for pixels in (clean, noisy):
                got = read_shape(pixels)
                assert {k: got[k] for k in ("shape", "colour", "position", "background")} == \
                    {k: meta[k] for k in ("shape", "colour", "position", "background")}, caption
    blank = np.full((64, 64, 3), BACKGROUNDS["dark"], np.uint8)
    assert read_shape(blank)["shape"] is None and read_shape(blank)["background"] == "dark"
    with pytest.raises(ValueError, match="shape"):
        read_shape(np.zeros((64, 64), np.uint8))


def test_prompt_following_scores_each_attribute():
    from data_tools.synthetic import parse_caption, prompt_following

    assert parse_caption("a large blue circle at the top left on a light background") == {
        "shape": "circle", "colour": "blue", "position": "at the top left", "background": "light", "size": "large"}
    with pytest.raises(ValueError, match="'a cat'"):
        parse_caption("a cat")
    img, caption, _ = draw_sample(0, 0, 64)
    wrong_colour = next(c for c in COLOURS if f" {c} " not in caption)
    right_colour = next(c for c in COLOURS if f" {c} " in caption)
    prompts = [caption, caption.replace(f" {right_colour} ", f" {wrong_colour} ")]
    scores = prompt_following(np.stack([np.asarray(img)] * 2), prompts)
    assert scores == {"colour": 0.5, "shape": 1.0, "position": 1.0, "background": 1.0, "all": 0.5}
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        prompt_following(np.asarray(img)[None], prompts)


def test_make_shards_resizes_crops_and_gives_the_same_shards_with_any_number_of_workers(tmp_path, capsys):
    items = _images(tmp_path / "in", n=6)  # 48 px wide, 40..80 px high, JPEG and PNG
    for path, _, cap in items:
        path.with_suffix(".txt").write_text(cap)
    outs = {}
    for workers in (1, 2):
        code, summary = run_cli(capsys, "make-shards", "--input", str(tmp_path / "in"), "--out",
                                str(tmp_path / f"w{workers}"), "--resize", "32", "--center-crop", "--min-size", "44",
                                "--workers", str(workers), "--shard-size", "2")
        assert code == 0 and summary["samples"] == 5 and summary["skipped"] == {"too_small": 1}
        outs[workers] = [(tmp_path / f"w{workers}" / f"{i:05d}.tar").read_bytes() for i in range(3)]
    assert outs[1] == outs[2]  # byte for byte
    samples = read_all(tmp_path / "w2")
    for s in samples:
        ext = "jpg" if "jpg" in s else "png"
        meta = json.loads(s["json"])
        assert Image.open(io.BytesIO(s[ext])).size == (32, 32) and (meta["width"], meta["height"]) == (32, 32)
        assert meta["original_width"] == 48 and meta["original_height"] >= 48
    # A JPEG stays a JPEG, a PNG a PNG; the crop is the centre of the resized image.
    by_path = {json.loads(s["json"])["original_path"]: s for s in samples}
    assert "jpg" in by_path[str(items[4][0])] and "png" in by_path[str(items[5][0])]
    src = Image.open(items[5][0]).convert("RGB")  # 48 x 80 PNG -> 32 x 53 -> rows 10..42
    expected = np.asarray(src.resize((32, 53), Image.BICUBIC, reducing_gap=None))[10:42]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(by_path[str(items[5][0])]["png"]))), expected)


def test_coco_recipe_draws_captions_and_a_manifest_of_their_images(tmp_path, capsys):
    code, _ = run_cli(capsys, "synthetic", "--layout", "coco", "--out", str(tmp_path / "coco"), "--num-samples", "5",
                      "--resolution", "64")
    annotations = tmp_path / "coco" / "annotations" / "captions_val2014.json"
    data = json.loads(annotations.read_text())
    data["annotations"].append({"id": 99, "image_id": 2, "caption": "A second\ncaption of image two."})
    annotations.write_text(json.dumps(data))
    args = ["coco", "--annotations", str(annotations), "--images", str(tmp_path / "coco" / "val2014"),
            "--num", "3", "--seed", "4"]
    code, summary = run_cli(capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 0 and summary["pairs"] == 3
    captions = (tmp_path / "a" / "captions.txt").read_text().splitlines()
    rows = [json.loads(line) for line in (tmp_path / "a" / "reference.jsonl").read_text().splitlines()]
    assert len(captions) == 3 and [r["caption"] for r in rows] == captions
    assert len({r["image"] for r in rows}) == 3 and all(Path(r["image"]).is_file() for r in rows)
    from data_tools.coco import coco_pairs  # every image, one caption each: COCO's stray newlines made spaces
    pairs = coco_pairs(annotations, tmp_path / "coco" / "val2014", num=0, seed=1)
    assert len(pairs) == 5 and all("\n" not in c for _, c in pairs)
    drawn = {c for seed in range(20) for _, c in coco_pairs(annotations, tmp_path / "coco" / "val2014", 0, seed)}
    assert "A second caption of image two." in drawn  # each image's caption is drawn among its captions
    run_cli(capsys, *args, "--out", str(tmp_path / "b"))  # seeded: the same draw
    assert (tmp_path / "b" / "captions.txt").read_text() == (tmp_path / "a" / "captions.txt").read_text()
    code, shards = run_cli(capsys, "make-shards", "--manifest", str(tmp_path / "a" / "reference.jsonl"),
                           "--out", str(tmp_path / "a" / "shards"), "--workers", "1")
    assert code == 0 and shards["samples"] == 3
    (tmp_path / "coco" / "val2014" / Path(rows[0]["image"]).name).unlink()
    with pytest.raises(SystemExit, match="drawn images are not in"):
        main([*args, "--out", str(tmp_path / "c"), "--num", "0"])


def test_img2dataset_shards_are_read_as_they_are(tmp_path, capsys, tiny_t5_dir):
    """An img2dataset webdataset shard (jpg, txt, json with its fields; a parquet and stats file
    beside it) is embedded with every entry kept, its metadata unread."""
    from data_tools.common import write_tar_atomic

    folder = tmp_path / "img2dataset"
    folder.mkdir()
    samples = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 80, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
        meta = {"url": f"https://example.com/{i}.jpg", "key": f"00000000{i}", "status": "success",
                "error_message": None, "width": 80, "height": 64, "original_width": 800,
                "original_height": 640, "exif": "{}", "sha256": "0" * 64, "caption": f"photo number {i}"}
        samples.append((f"00000000{i}", {"jpg": buf.getvalue(), "txt": f"photo number {i}".encode(),
                                         "json": json.dumps(meta).encode()}))
    write_tar_atomic(folder / "00000.tar", samples)
    (folder / "00000.parquet").write_bytes(b"PAR1 not read")
    (folder / "00000_stats.json").write_text("{}")
    code, summary = run_cli(capsys, "precompute-embeddings", "--shards", str(folder / "00000.tar"),
                            "--encoder", str(tiny_t5_dir), "--out", str(tmp_path / "emb"))
    assert code == 0 and summary["samples_written"] == 3
    out = list(iter_raw_samples(str(tmp_path / "emb" / "00000.tar")))
    assert [s["json"] for s in out] == [e["json"] for _, e in samples]  # carried unread
    code, check = run_cli(capsys, "verify", "--shards", str(tmp_path / "emb" / "00000.tar"), "--inputs",
                          str(folder / "00000.tar"), "--require-embeddings")
    assert code == 0 and check["ok"]


def test_synthetic_folder_layout_is_make_shards_input(tmp_path, capsys):
    code, _ = run_cli(capsys, "synthetic", "--layout", "folder", "--out", str(tmp_path / "imgs"),
                      "--num-samples", "3", "--resolution", "64")
    assert code == 0 and len(list((tmp_path / "imgs").glob("*.png"))) == 3
    code, summary = run_cli(capsys, "make-shards", "--input", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"))
    assert code == 0 and summary["samples"] == 3
    from data_tools.synthetic import draw_sample
    assert [s["txt"].decode() for s in read_all(tmp_path / "s")] == [draw_sample(0, i, 64)[1] for i in range(3)]
