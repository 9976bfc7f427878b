"""Shared session fixtures: a tiny offline T5 encoder and small synthetic shard sets.

- `tiny_t5_dir`: a save_pretrained folder holding a random-weight T5EncoderModel (d_model 64)
  and a SentencePiece T5 tokenizer trained on the fly. Nothing is downloaded.
- `shards_64`: 48 synthetic 64 px samples in 6 shards of 8, with precomputed embeddings.
- `shards_1024`: 8 synthetic 1024 px samples in 2 shards of 4, with embeddings (SR stages).
Each shard-set fixture returns a `ShardSet` (folder, brace pattern, urls, embed_dim).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_T5_DIM = 64

def build_tiny_t5(folder: Path, d_model: int = TINY_T5_DIM, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a random-weight T5 encoder + freshly trained SentencePiece tokenizer to `folder`."""
    from imagen_train.text.tiny import build_tiny_t5 as build
    return build(folder, d_model=d_model, num_layers=num_layers, seed=seed)


@dataclass
class ShardSet:
    """A folder of shards with precomputed embeddings."""

    folder: Path
    pattern: str      # brace pattern naming every shard
    urls: list[str]
    num_samples: int
    embed_dim: int


def _make_shard_set(root: Path, t5_dir: Path, num_samples: int, resolution: int, shard_size: int,
                    image_format: str) -> ShardSet:
    from data_tools.precompute import precompute_embeddings
    from data_tools.synthetic import write_synthetic

    raw = root / "raw"
    write_synthetic(out=raw, num_samples=num_samples, resolution=resolution, shard_size=shard_size,
                    seed=0, image_format=image_format, progress_bar=False)
    out = root / "emb"
    raw_urls = sorted(str(p) for p in raw.glob("*.tar"))
    precompute_embeddings(shards=raw_urls, encoder=str(t5_dir), out=out, batch_size=16, progress_bar=False)
    urls = sorted(str(p) for p in out.glob("*.tar"))
    pattern = str(out / f"{{00000..{len(urls) - 1:05d}}}.tar")
    return ShardSet(out, pattern, urls, num_samples, TINY_T5_DIM)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A save_pretrained folder with a tiny random T5 encoder and its tokenizer."""
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5") / "t5")


@pytest.fixture(scope="session")
def shards_64(tmp_path_factory, tiny_t5_dir) -> ShardSet:
    """48 synthetic 64 px samples in 6 shards of 8, with tiny-T5 embeddings."""
    return _make_shard_set(tmp_path_factory.mktemp("shards_64"), tiny_t5_dir, 48, 64, 8, "png")


@pytest.fixture(scope="session")
def shards_1024(tmp_path_factory, tiny_t5_dir) -> ShardSet:
    """8 synthetic 1024 px JPEG samples in 2 shards of 4, with tiny-T5 embeddings."""
    return _make_shard_set(tmp_path_factory.mktemp("shards_1024"), tiny_t5_dir, 8, 1024, 4, "jpg")


# ----------------------------------------------------------------------------------------------
# Tiers (README, "Test"): `multirank` (several ranks, or a training job in subprocesses) and
# `bench` (a rehearsal of a bench/ script) are also `slow`, so `pytest -m "not slow"` is the unit
# tier. A test marks itself `slow` when it is neither but too long for the unit tier.

TIERS = {"multirank": "launches several ranks or trains in subprocesses (also slow)",
         "bench": "rehearses a bench/ script at tiny size (also slow)",
         "slow": "outside the unit tier: `pytest -m 'not slow'` leaves it out"}


def pytest_configure(config):
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


# Module fixtures that launch training ranks: a test that uses one is multi-rank whatever it checks.
MULTIRANK_FIXTURES = {"eval_traffic", "straight", "straight_run", "curves", "resumed_runs", "one_node", "slurm", "hosts"}


# The files that take longest (`--cpu-times`, 2-core VM), run first: pytest-xdist's loadfile hands
# out whole files in collection order, so the two workers of `-n 2 --dist loadfile` end together
# instead of one finishing a long file alone. The order of the tests within a file is kept.
LONGEST_FIRST = ("test_quickstart.py", "test_training.py", "test_preemption.py", "test_evaluation.py",
                 "test_fault_tolerance.py", "test_guide.py", "test_slurm.py", "test_hostfile.py",
                 "test_gpu_check.py", "test_resume_reshard.py", "test_logging.py")


def _file_rank(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable
    for item in items:
        if MULTIRANK_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("multirank"):
            item.add_marker(pytest.mark.multirank)
        if any(item.get_closest_marker(name) for name in ("multirank", "bench")) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


# The unit tier stays single-process: a test outside `multirank` and `bench` that launches training
# ranks (torchrun, the deepspeed launcher, sbatch) fails, naming the marker.
RANK_LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed", "sbatch")


def rank_launcher(args) -> "str | None":
    """The word of a subprocess command line that launches training ranks, or None."""
    if isinstance(args, str):
        words = args.split()
    else:
        words = [args] if isinstance(args, (bytes, os.PathLike)) else list(args)
    def launches(word: str) -> bool:  # a bare name or module, or the installed one (not a stand-in script)
        return word in RANK_LAUNCHERS or (os.path.basename(word) in RANK_LAUNCHERS and (
            shutil.which(os.path.basename(word)) == word or os.path.dirname(word) == os.path.dirname(sys.executable)))

    return next((w for w in map(str, words) if launches(w)), None)


@pytest.fixture(autouse=True)
def _unit_tests_launch_no_ranks(request, monkeypatch):
    if request.node.get_closest_marker("multirank") or request.node.get_closest_marker("bench"):
        return
    popen_init = subprocess.Popen.__init__

    def checked(self, args, *rest, **kwargs):
        launcher = rank_launcher(args)
        if launcher is not None:
            pytest.fail(f"{request.node.nodeid} launches training ranks ({launcher}): mark it "
                        f"@pytest.mark.multirank", pytrace=False)
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked)


# ----------------------------------------------------------------------------------------------
# `--cpu-times PATH`: wall and CPU seconds per test (this process, and the children it waited
# for: training ranks, launchers), written as JSON. On a shared machine wall time grows with the
# load; CPU time much less so.

def pytest_addoption(parser):
    parser.addoption("--cpu-times", metavar="PATH", default=None,
                     help="write each test's wall and CPU seconds (self and waited-for children) to PATH")


def _cpu_seconds() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


_CPU_TIMES = pytest.StashKey[list]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not item.config.getoption("--cpu-times"):
        return (yield)
    wall, (me, kids) = time.perf_counter(), _cpu_seconds()
    result = yield
    me_after, kids_after = _cpu_seconds()
    item.config.stash.setdefault(_CPU_TIMES, []).append({
        "test": item.nodeid, "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(me_after - me, 2), "children_cpu_s": round(kids_after - kids, 2)})
    return result


def pytest_sessionfinish(session):
    """Each xdist worker writes PATH.<worker>; the controller (or a run without workers), whose
    session ends last, writes PATH with every row and removes the workers' files."""
    path = session.config.getoption("--cpu-times")
    if not path:
        return
    rows = session.config.stash.get(_CPU_TIMES, [])
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        Path(f"{path}.{worker}").write_text(json.dumps(rows))
        return
    for part in sorted(Path(path).parent.glob(Path(path).name + ".gw*")):
        rows += json.loads(part.read_text())
        part.unlink()
    Path(path).write_text(json.dumps(rows, indent=1))
