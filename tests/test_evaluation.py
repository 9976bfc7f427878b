"""FID (our TF-compatible Inception-v3), CLIP score, fid-stats, and periodic evaluation in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from imagen_train.evaluation.fid import FeatureStats, fid_from_features, frechet_distance
from imagen_train.evaluation.inception import FIDInceptionV3, load_fid_inception, resize_bilinear_tf1
from imagen_train.evaluation.weights import MissingWeightsError

from sampling_helpers import build_tiny_clip, random_fid_inception


def _direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return random_fid_inception(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_fid_of_a_set_against_itself_is_zero_and_matches_scipy():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(32, 32))
    real = rng.normal(size=(500, 32)) @ mix
    fake = 1.3 * (rng.normal(size=(400, 32)) @ mix) + 0.5
    assert abs(fid_from_features(real, real)) < 1e-6 * np.trace(np.cov(real, rowvar=False))
    ours = fid_from_features(torch.from_numpy(real).float(), torch.from_numpy(fake).float())
    direct = _direct_fid(real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64))
    assert ours > 1.0
    assert ours == pytest.approx(direct, rel=1e-3)
    # Statistics round-trip through the cached .npz.
    stats = FeatureStats.from_features(real)
    assert frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma) == pytest.approx(0, abs=1e-6)


def test_low_rank_fid_matches_the_full_computation():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(20, 48)), rng.normal(size=(16, 48)) * 1.5 + 0.3  # N < D: singular covariances
    full = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert fid_from_features(real, fake) == pytest.approx(full, rel=1e-6)
    assert fid_from_features(real, fake) == pytest.approx(_direct_fid(real, fake), rel=1e-3)
    assert abs(fid_from_features(real, real)) < 1e-8 * np.trace(np.cov(real, rowvar=False))


@pytest.mark.slow
def test_inception_weights_load_strict_with_the_standard_names(inception_file):
    net = load_fid_inception(str(inception_file))
    saved = torch.load(inception_file, weights_only=True)
    for key, value in saved.items():
        torch.testing.assert_close(net.state_dict()[key], value)
    # The names and shapes of the ported TF file (torchvision Inception3 layout, 1008 classes, no aux).
    shapes = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
                "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5), "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
                "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
                "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
                "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith("AuxLogits") for k in shapes)
    assert sum(v.numel() for k, v in FIDInceptionV3().named_parameters()) == 23_850_960
    # A state dict carrying exactly the standard key names (no batch counters) loads strictly.
    standard = {k: torch.randn(s) if k.endswith("weight") or k.endswith("bias") else torch.rand(s) + 0.5
                for k, s in shapes.items() if not k.endswith("num_batches_tracked")}
    FIDInceptionV3().load_state_dict({**standard, **{k: torch.tensor(0) for k in shapes
                                                     if k.endswith("num_batches_tracked")}}, strict=True)
    torch.save(standard, inception_file.parent / "standard.pth")
    load_fid_inception(str(inception_file.parent / "standard.pth"))
    # A file with a wrong or missing key is refused with the setting named.
    torch.save({k: v for k, v in standard.items() if k != "fc.bias"}, inception_file.parent / "bad.pth")
    with pytest.raises(MissingWeightsError, match="evaluation.inception_path"):
        load_fid_inception(str(inception_file.parent / "bad.pth"))


def test_tf1_bilinear_resize():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert torch.equal(resize_bilinear_tf1(x, 8), x)
    torch.testing.assert_close(resize_bilinear_tf1(x, 4), x[..., ::2, ::2])  # src = 2 * dst, no half-pixel shift
    up = resize_bilinear_tf1(x, 16)
    assert up[0, 0, 0, 1] == pytest.approx(0.5) and up[0, 0, -1, -1] == 63.0


def test_fid_path_with_random_inception(inception_file):
    net = load_fid_inception(str(inception_file))
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (3, 3, 64, 64), generator=gen, dtype=torch.uint8)
    fake = (real.float() * 0.5 + 60).to(torch.uint8)
    fr, ff = net(real), net(fake)
    assert fr.shape == (3, 2048) and torch.isfinite(fr).all()
    torch.testing.assert_close(net(real[:1]), fr[:1], rtol=1e-4, atol=1e-5)  # batch-independent (eval BN)
    assert fid_from_features(fr, fr) == pytest.approx(0.0, abs=1e-6 * float(fr.var(0).sum()))
    ours = fid_from_features(fr, ff)
    # Direct NumPy on the same features: Tr((S_r S_f)^(1/2)) from the eigenvalues of the small
    # Gram product (the nonzero spectrum of S_r S_f when N < D).
    a, b = fr.double().numpy(), ff.double().numpy()
    A, B = a - a.mean(0), b - b.mean(0)
    eig = np.linalg.eigvals((A @ B.T) @ (B @ A.T) / ((len(a) - 1) * (len(b) - 1))).real
    direct = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
              + np.trace(np.cov(b, rowvar=False)) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
    assert ours > 0 and ours == pytest.approx(direct, rel=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        net(real.float())


def test_clip_score_is_the_plain_mean_cosine(clip_dir):
    from imagen_train.evaluation.clip_score import ClipScorer

    scorer = ClipScorer(str(clip_dir))
    images = torch.randint(0, 256, (3, 3, 48, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    captions = ["a red circle", "a blue square at the top", "dog"]
    cos = scorer.cosine(images, captions, batch_size=2)
    assert cos.shape == (3,) and (cos.abs() <= 1 + 1e-5).all()
    # The same numbers straight from the model's projections.
    model = scorer.model
    pix = scorer.preprocess(images)
    assert pix.shape == (3, 3, 32, 32)
    img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
    tok = scorer.tokenizer(captions, padding=True, return_tensors="pt")
    txt = model.text_projection(model.text_model(**tok).pooler_output)
    direct = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(cos, direct.detach(), rtol=1e-4, atol=1e-5)


def test_missing_weights_name_the_setting(tmp_path):
    from imagen_train.evaluation.clip_score import ClipScorer

    with pytest.raises(MissingWeightsError, match=r"evaluation.inception_path is not set.*pt_inception-2015-12-05"
                                                  r".*weights-inception-2015-12-05"):
        load_fid_inception(None)
    with pytest.raises(MissingWeightsError, match=r"evaluation.inception_path=.*nope.pth: no such file"):
        load_fid_inception(str(tmp_path / "nope.pth"))
    with pytest.raises(MissingWeightsError, match=r"evaluation.clip_path is not set.*CLIPModel"):
        ClipScorer(None)
    with pytest.raises(MissingWeightsError, match=r"evaluation.clip_path=.*: no such folder"):
        ClipScorer(str(tmp_path / "no-clip"))
    # The periodic evaluator refuses at start-up, before any training.
    from imagen_train.config import load_preset
    from imagen_train.evaluation.periodic import make_periodic_evaluator

    cfg = load_preset("base64-tiny", ["evaluation.eval_every_steps=2", "evaluation.num_fid_samples=8",
                                      f"evaluation.inception_path={tmp_path / 'missing.pth'}"])
    with pytest.raises(MissingWeightsError, match="evaluation.inception_path"):
        make_periodic_evaluator(cfg)


def test_fid_statistics_carry_our_pipeline_label_and_others_are_refused(tmp_path):
    from imagen_train.evaluation.fid import FIDStatsPipelineError, require_fid_stats
    from imagen_train.evaluation.inception import FID_PIPELINE

    rng = np.random.default_rng(3)
    stats = FeatureStats.from_features(rng.normal(size=(10, 8)))
    ours = stats.save(tmp_path / "ours.npz", resolution="64")
    with np.load(ours) as data:
        assert str(data["pipeline"]) == FID_PIPELINE and str(data["resolution"]) == "64"
    back = FeatureStats.load(ours)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.num_samples == 10 and require_fid_stats(ours) == ours
    # A pytorch-fid statistics file (mu and sigma only) and a file labelled with another pipeline
    # are refused, naming the setting, the file and the way out.
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)
    with pytest.raises(FIDStatsPipelineError, match=r"evaluation.fid_stats_path=.*pytorch_fid.npz: .*carry no "
                                                    r"pipeline label.*data_tools fid-stats.*FeatureStats\(mu, sigma, n\)"):
        FeatureStats.load(tmp_path / "pytorch_fid.npz")
    np.savez(tmp_path / "other.npz", mu=stats.mu, sigma=stats.sigma, pipeline=np.array("pytorch-fid 0.3.0"))
    with pytest.raises(FIDStatsPipelineError, match=r"--stats=.*other.npz: .*labelled 'pytorch-fid 0.3.0'"):
        require_fid_stats(tmp_path / "other.npz", "--stats")
    # Labelling on purpose: statistics known to come from the same pipeline are saved through ours.
    with np.load(tmp_path / "other.npz") as data:
        relabelled = FeatureStats(data["mu"], data["sigma"], 10).save(tmp_path / "relabelled.npz")
    assert FeatureStats.load(relabelled).num_samples == 10
    # The periodic evaluator checks the label at start-up, before any training.
    from imagen_train.config import load_preset
    from imagen_train.evaluation.periodic import make_periodic_evaluator

    weights = random_fid_inception(tmp_path / "inception.pth")
    cfg = load_preset("base64-tiny", ["evaluation.eval_every_steps=2", "evaluation.num_fid_samples=8",
                                      f"evaluation.inception_path={weights}",
                                      f"evaluation.fid_stats_path={tmp_path / 'pytorch_fid.npz'}"])
    with pytest.raises(FIDStatsPipelineError, match="evaluation.fid_stats_path"):
        make_periodic_evaluator(cfg)


def test_fid_stats_command_caches_reference_statistics(tmp_path, shards_64, inception_file):
    from data_tools.__main__ import main
    from data_tools.fid_stats import iter_images

    out = tmp_path / "stats.npz"
    assert main(["fid-stats", "--shards", shards_64.pattern, "--inception", str(inception_file), "--out", str(out),
                 "--resolution", "64", "--max-samples", "6", "--no-progress"]) == 0
    stats = FeatureStats.load(out)
    assert stats.num_samples == 6 and stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048)
    net = load_fid_inception(str(inception_file))
    feats = net(torch.stack(list(iter_images(shards_64.pattern, 64, 6))))
    again = FeatureStats.from_features(feats)
    np.testing.assert_allclose(again.mu, stats.mu, rtol=1e-5, atol=1e-6)
    with pytest.raises(MissingWeightsError, match="--inception"):
        main(["fid-stats", "--shards", shards_64.pattern, "--inception", str(tmp_path / "x.pth"),
              "--out", str(out)])


@pytest.mark.multirank
def test_periodic_evaluation_writes_grids_and_leaves_training_unchanged(tmp_path, shards_64, tiny_t5_dir,
                                                                        inception_file, clip_dir):
    from safetensors.torch import load_file

    from imagen_train.artifacts import export_checkpoint
    from train_helpers import read_metrics, run_training, tiny_overrides

    plain, evaluated = tmp_path / "plain", tmp_path / "eval"
    common = dict(zero_stage=3, max_steps=4, **{"text.encoder_path": str(tiny_t5_dir)})
    run_training("base64-tiny.yaml", tiny_overrides(plain, shards_64.pattern, shards_64.embed_dim, **common))
    proc = run_training("base64-tiny.yaml", tiny_overrides(
        evaluated, shards_64.pattern, shards_64.embed_dim, **common, **{
            "evaluation.eval_every_steps": 2, "evaluation.prompts": "[a red circle, a blue square]",
            "evaluation.num_images_per_prompt": 2, "evaluation.sampler.steps": 2,
            "evaluation.sampler.guidance_scale": 2.0, "evaluation.num_fid_samples": 2,
            "evaluation.inception_path": str(inception_file), "evaluation.clip_path": str(clip_dir),
            "data.eval_shards": shards_64.pattern}))
    for step in (2, 4):
        assert (evaluated / "samples" / f"step_{step}.png").is_file(), proc.stdout[-3000:]
    from PIL import Image
    assert Image.open(evaluated / "samples" / "step_2.png").size == (2 * 64 + 6, 2 * 64 + 6)
    evals = [m for m in read_metrics(evaluated) if "eval/time_s" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(np.isfinite(m["eval/fid"]) and -1 <= m["eval/clip_score"] <= 1 for m in evals)
    # Same weights (EMA and raw) and the same losses as the run without evaluation.
    a = load_file(str(export_checkpoint(plain / "checkpoints" / "step_00000004", tmp_path / "a.safetensors", True)))
    b = load_file(str(export_checkpoint(evaluated / "checkpoints" / "step_00000004", tmp_path / "b.safetensors",
                                        True)))
    assert a.keys() == b.keys() and any(k.startswith("raw.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed by periodic evaluation"
    la = [m["train/loss"] for m in read_metrics(plain) if "train/loss" in m]
    lb = [m["train/loss"] for m in read_metrics(evaluated) if "train/loss" in m]
    assert la == lb and len(la) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialize_ema_fills_a_meta_built_network_in_the_sampling_dtype(dtype):
    """One process (one slice per parameter, placed without a gather; the windows of the gather are
    tested below with simulated ranks, and at 2 and 4 ranks by tests/dist_ema_check.py and
    bench/eval_traffic.py): each parameter is placed from its slice, cast to the sampling
    dtype, and no parameter is left on the meta device."""
    from imagen_train.config import load_preset
    from imagen_train.evaluation.periodic import sampling_dtype
    from imagen_train.models import build_model
    from imagen_train.training.ema_network import EMANetwork

    cfg = load_preset("base64-tiny", [])
    torch.manual_seed(3)
    state = {k: v + 0.25 for k, v in build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
             .state_dict().items()}
    layout = {k: {"shape": list(v.shape), "numel": v.numel(), "start": 0, "end": v.numel()}
              for k, v in state.items()}
    shadow = {k: v.reshape(-1) for k, v in state.items()}
    net = EMANetwork(cfg, layout, shadow)(dtype, torch.device("cpu"))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for name, p in net.named_parameters():
        assert p.device.type == "cpu" and p.dtype == dtype
        assert torch.equal(p, state[name].to(dtype)), name
    assert sampling_dtype(torch.device("cpu")) == torch.float32
    # A layout that does not cover a parameter is refused, not sampled with garbage.
    from imagen_train.artifacts import CheckpointError
    name = next(iter(layout))
    short = {**layout, name: {**layout[name], "end": layout[name]["end"] - 1}}
    with pytest.raises(CheckpointError, match=f"EMA slices of '{name}' cover"):
        EMANetwork(cfg, short, shadow)(dtype, torch.device("cpu"))


def test_flat_ema_windows_place_every_ranks_slices_exactly():
    """Three simulated ranks with uneven bounds (a parameter whole on one rank as under ZeRO-1/2,
    parameters cut over several ranks as under ZeRO-3, empty slices): each rank's flat EMA, cut
    into windows that split slices and parameters, lands exactly where its bounds say."""
    from imagen_train.training.ema_network import FlatLayout, fill_window, place_window

    numels = [7, 1, 12, 5, 9]
    full = [torch.arange(n, dtype=torch.float32) + 100 * i for i, n in enumerate(numels)]
    cuts = [[(0, 7), (0, 1), (0, 0), (0, 0), (0, 3)],      # rank 0: two whole parameters, a slice
            [(0, 0), (1, 1), (0, 12), (0, 2), (3, 9)],     # rank 1
            [(7, 7), (1, 1), (12, 12), (2, 5), (9, 9)]]    # rank 2: one slice only
    flats = [FlatLayout.from_bounds(bounds) for bounds in cuts]
    assert [f.length for f in flats] == [11, 20, 3]
    for width in (1, 3, 4, 20):
        longest = max(f.length for f in flats)
        out = [torch.full((n,), -1.0) for n in numels]
        for begin in range(0, longest, width):
            rows = []
            for bounds, flat in zip(cuts, flats):  # what each rank sends
                window = torch.zeros(min(width, longest - begin))
                fill_window(window, flat, begin, [t[s:e] for t, (s, e) in zip(full, bounds)])
                rows.append(window)
            for row, flat in zip(rows, flats):  # what every rank places from the gathered rows
                place_window(row, flat, begin, out)
        for i, (got, want) in enumerate(zip(out, full)):
            assert torch.equal(got, want), (width, i, got)
    # The flat EMA of rank 1 is its slices in parameter order.
    window = torch.zeros(20)
    fill_window(window, flats[1], 0, [t[s:e] for t, (s, e) in zip(full, cuts[1])])
    assert torch.equal(window, torch.cat([full[2], full[3][:2], full[4][3:]]))


@pytest.mark.bench
def test_eval_memory_benchmark_measures_both_paths(tmp_path):
    """bench/eval_memory.py at tiny size: every path measured, sizes counted from the network, and
    the peaks within bounds the paths imply."""
    import json
    import subprocess
    import sys

    from imagen_train.config import load_preset
    from imagen_train.models import build_model, count_parameters

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "eval_memory.json"
    subprocess.run([sys.executable, str(repo / "bench" / "eval_memory.py"), "--presets", "base64-tiny",
                    "--steps", "1", "--batch", "1", "--threads", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    row = json.loads(out.read_text())["rows"][0]
    cfg = load_preset("base64-tiny", [])
    with torch.device("meta"):
        numel = count_parameters(build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution))
    assert row["parameters"] == numel and row["net_bytes"] == 4 * numel and row["dtype"] == "float32"
    x_net = {key: m["peak_added_bytes"] / row["net_bytes"] for key, m in row.items() if "/" in key}
    assert {m["kind"] for key, m in row.items() if "/" in key} == {"cpu_vmhwm"}, row  # a resettable peak (Linux)
    # The evaluation network costs one copy of itself (docs/benchmarks.md: 1.00-1.07x); the old
    # path held three fp32 copies at once (the gathered buffer, the clones, the network). Margins
    # cover page rounding and allocator slack at 3 MiB.
    assert 0.9 <= x_net["materialize_ema/build"] <= 1.5, x_net
    assert x_net["before/build"] >= 2.5, x_net
    # Sampling happens with the network alive: never less than one copy of it.
    assert x_net["materialize_ema/build+sample"] >= 0.9 and x_net["before/build+sample"] >= 0.9, x_net


@pytest.fixture(scope="module")
def eval_traffic(tmp_path_factory, tiny_t5_dir) -> dict[int, list[dict]]:
    """bench/eval_traffic.py at 1, 2 and 4 CPU ranks of base64-tiny, ZeRO 2 and 3 (ZeRO-1 cuts the
    EMA as ZeRO-2 does, ZeRO-0 as ZeRO-3; docs/benchmarks.md has all four). {world size: one row
    per rank and stage}."""
    import json
    import subprocess
    import sys

    from train_helpers import free_port, train_env

    repo = Path(__file__).resolve().parent.parent
    out = {}
    for world in (1, 2, 4):
        folder = tmp_path_factory.mktemp(f"traffic{world}")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={free_port()}", str(repo / "bench" / "eval_traffic.py"), "--t5", str(tiny_t5_dir),
               "--stages", "2", "3", "--run-dir", str(folder / "run"), "--json", str(folder / "out.json")]
        proc = subprocess.run(cmd, cwd=repo, env=train_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        out[world] = json.loads((folder / "out.json").read_text())["rows"]
    return out


@pytest.mark.multirank
def test_each_rank_receives_about_one_model_per_evaluation_at_any_world_size(eval_traffic):
    """The bytes a rank receives in one periodic evaluation stay within one model in the sampling
    dtype (fp32 on a CPU) plus the stated small terms, at 1, 2 and 4 ranks and ZeRO 2 and 3; the
    per-parameter gather this replaced would break that bound under ZeRO-2 at 4 ranks."""
    from imagen_train.config import load_preset
    from imagen_train.models import build_model

    cfg = load_preset("base64-tiny", ["text.max_length=16"])
    with torch.device("meta"):
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    numel, tensors = sum(p.numel() for p in net.parameters()), len(list(net.parameters()))
    model_bytes = 4 * numel                                       # fp32: the CPU sampling dtype
    prompts, length, width, res = 2, 16, 64, cfg.train_resolution  # bench/eval_traffic.py's grid
    for world, rows in eval_traffic.items():
        stages = {r["zero_stage"] for r in rows}
        assert sorted((r["rank"], r["zero_stage"]) for r in rows) == sorted(
            (rank, stage) for rank in range(world) for stage in stages)
        # The bound, term by term: the model; the flat EMAs' padding to the longest rank (at most
        # one element per tensor per rank where ZeRO cuts each tensor evenly, or DeepSpeed's
        # alignment of 2 x world elements); every rank's slice bounds (int64 pairs, first call
        # only); the prompt embeddings (fp32) and masks; the grid's images gathered from the
        # other ranks (fp32, ceil(prompts / world) rows each, with their row count); 4 KiB for
        # the pickled metadata of the broadcasts.
        padding = (world - 1) * (tensors + 2 * world) * 4
        bounds = (world - 1) * tensors * 16
        embeddings = prompts * length * (width * 4 + 1)
        grid = (world - 1) * (8 + -(-prompts // world) * 3 * res * res * 4)
        bound = model_bytes + padding + bounds + embeddings + grid + 4096
        for r in rows:
            assert r["parameters"] == numel and r["matches_initial_weights"], r
            assert r["counter_check_bytes"] == (world - 1) * 4000
            for call in ("first", "again", "resumed"):
                got = r[call]["received_bytes"]
                assert r[call]["logged_received_bytes"] == got
                assert got <= bound, (world, r["zero_stage"], r["rank"], call, got, bound)
                # Everything this rank does not hold must arrive: the counter sees the gather.
                assert got >= 4 * (numel - r["own_elements"]), (world, r["zero_stage"], call, got)
            if world == 4 and r["zero_stage"] == 2:
                assert r["old_per_parameter_gather_bytes"] > 2 * bound  # ~3 models: the bound tells them apart
    assert all(r[c]["received_bytes"] == 0 for r in eval_traffic[1] for c in ("first", "again", "resumed"))


def test_only_rank_0_loads_the_text_encoder_once(eval_traffic):
    """evaluation.prompts are encoded once, on rank 0; the other ranks never load a text encoder
    (nor import transformers), and a new evaluator over the same run folder (a resumed run)
    reads the embeddings back instead of loading the encoder again."""
    for world, rows in eval_traffic.items():
        for r in rows:
            first = 1 if r["rank"] == 0 else 0
            assert [r[c]["encoder_loads"] for c in ("first", "again", "resumed")] == [first, 0, 0], (world, r)
            assert r["transformers_imported"] == (r["rank"] == 0), (world, r["rank"])


@pytest.mark.slow
def test_random_inception_tells_images_apart():
    """The offline stand-in must not collapse every image to the same features (FID ~0)."""
    import torch

    from imagen_train.evaluation.fid import fid_from_features
    from imagen_train.evaluation.inception import FIDInceptionV3

    net = FIDInceptionV3.random(seed=0)
    gen = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 60, (6, 3, 64, 64), generator=gen, dtype=torch.uint8)
    light = torch.randint(190, 255, (6, 3, 64, 64), generator=gen, dtype=torch.uint8)
    f_dark, f_light = net(dark), net(light)
    assert f_dark.std(0).mean() > 1e-4
    assert fid_from_features(f_dark, f_light) > 100 * max(fid_from_features(f_dark[:3], f_dark[3:]), 1e-6)


@pytest.mark.slow
def test_evaluate_sweeps_guidance_and_writes_table_and_plot(tmp_path, tiny_t5_dir, inception_file, clip_dir):
    """launch/evaluate.py end to end at 64 px: one row per guidance scale, CSV, markdown, PNG plot."""
    import csv
    import json

    from PIL import Image

    from sampling_helpers import export_tiny

    REPO = Path(__file__).resolve().parent.parent
    base = export_tiny("base64", tmp_path / "base64.safetensors", live=True)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\na green triangle\n")
    net = load_fid_inception(str(inception_file))
    gen = torch.Generator().manual_seed(1)
    real = torch.randint(0, 255, (6, 3, 64, 64), generator=gen, dtype=torch.uint8)
    stats = FeatureStats.from_features(net(real)).save(tmp_path / "stats.npz", resolution="64")
    from launch.evaluate import main

    sets = {"checkpoints.base64": base, "evaluation.resolution": 64, "encoder_path": tiny_t5_dir,
            "device": "cpu", "evaluation.images_per_caption": 2, "samplers.base64.steps": 2,
            "evaluation.captions_file": captions, "evaluation.guidance_scales": "[1.0, 5.0]",
            "evaluation.fid_stats_path": stats, "evaluation.inception_path": inception_file,
            "evaluation.clip_path": clip_dir, "evaluation.save_images": True}
    argv = ["--config", str(REPO / "configs" / "inference_pipeline.yaml"), "--out", str(tmp_path / "sweep")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 5.0]
    assert all(float(r["fid"]) >= 0 and -1 <= float(r["clip_score"]) <= 1 for r in rows)
    assert all(int(r["num_images"]) == 6 for r in rows)  # 3 captions x 2 images
    for scale in ("1", "5"):  # evaluation.save_images: every sampled image, per guidance scale
        saved = sorted((tmp_path / "sweep" / "images" / f"g{scale}").glob("*.png"))
        assert len(saved) == 6 and Image.open(saved[0]).size == (64, 64)
    assert all(float(r["fid"]) > 0 for r in rows)
    assert rows[0]["clip_score"] != rows[1]["clip_score"]  # the guidance scale reaches the sampler
    assert "| guidance | FID | CLIP score |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert Image.open(tmp_path / "sweep" / "sweep.png").size[0] > 100
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"] == json.loads(
        json.dumps([{k: (float(v) if k in ("guidance_scale", "fid", "clip_score", "time_s") else int(v))
                     for k, v in r.items()} for r in rows]))
