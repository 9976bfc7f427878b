"""docs/CONTRACTS.md against the code: the batch table against the batches the training loader
really yields (every stage), and bench/ importing no test module."""

from __future__ import annotations

import ast
import math
import os
import re
from pathlib import Path

import pytest
import torch

from imagen_train.config import load_preset
from imagen_train.data import Batch, build_train_loader, iter_shard_samples
from imagen_train.data.schema import EMBED_KEY, EMBED_META_KEY, read_embedding
from imagen_train.stages import STAGE_NAMES, get_stage

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "CONTRACTS.md"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bool": torch.bool}


def batch_table(doc: Path = DOC) -> dict[str, dict[str, object]]:
    """{key: {"dtype", "shape" (symbols), "stages", "what"}} from the doc's batch-keys table."""
    text = doc.read_text()
    match = re.search(r"<!-- batch-keys -->\n(.*?)<!-- /batch-keys -->", text, re.S)
    assert match, f"{doc} has no <!-- batch-keys --> table"
    rows = {}
    for line in match.group(1).strip().splitlines()[2:]:  # after the header and its rule
        key, dtype, shape, stages, what = (c.strip() for c in line.strip().strip("|").split("|"))
        rows[key.strip("`")] = {"dtype": dtype, "shape": tuple(s.strip() for s in shape.strip("()").split(",") if s.strip()),
                                "stages": stages, "what": what}
    return rows


@pytest.fixture(scope="module")
def token_counts(shards_64) -> dict[str, int]:
    """Tokens of every sample's caption embedding, by the batch's `key`, read from the shards."""
    counts = {}
    for raw in iter_shard_samples(shards_64.urls):
        emb, _ = read_embedding(raw[EMBED_KEY], raw[EMBED_META_KEY])
        counts[f"{os.path.basename(raw['__url__'])}:{raw['__key__']}"] = emb.shape[0]
    return counts


def loader_batch(shards: str, stage: str, pad_to_longest: bool = True, max_length: int = 32):
    """(one training batch of `stage`'s tiny preset, its config); every stage reads the 64 px
    shards (smaller images are upsized where `data.min_image_size` allows)."""
    cfg = load_preset(get_stage(stage).tiny_preset, [
        f"data.train_shards={shards}", "data.num_workers=0", "data.shuffle_buffer=4", "data.min_image_size=64",
        f"text.max_length={max_length}", f"text.pad_to_longest={pad_to_longest}",
        "training.micro_batch_size=3", "training.global_batch_size=3"])
    loader = build_train_loader(cfg, 0, 1)
    batch = next(loader)
    loader.close()
    return batch, cfg


def departures(batch: dict, cfg, table: dict, tokens: list[int]) -> list[str]:
    """How `batch` departs from the documented table (empty: it matches)."""
    super_resolution = get_stage(cfg.stage).is_super_resolution
    documented = {k for k, row in table.items() if row["stages"] == "all" or (super_resolution and row["stages"] == "SR")}
    bad = [f"keys {sorted(set(batch))} != documented {sorted(documented)}"] if set(batch) != documented else []
    max_length = cfg.text.max_length
    size = {"B": cfg.training.micro_batch_size, "3": 3, "T": cfg.train_resolution, "t": cfg.lowres_resolution,
            "D": cfg.text.embed_dim,
            "L": min(max_length, math.ceil(max(tokens) / 8) * 8) if cfg.text.pad_to_longest else max_length}
    for key in sorted(documented & set(batch)):
        row, value = table[key], batch[key]
        shape = tuple(size[s] for s in row["shape"])
        if row["dtype"] == "list[str]":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value) and (len(value),) == shape):
                bad.append(f"{key}: not a list of {shape} str")
            continue
        if value.dtype != DTYPES[row["dtype"]] or tuple(value.shape) != shape:
            bad.append(f"{key}: {value.dtype} {tuple(value.shape)}, documented {row['dtype']} {shape}")
        elif "in [-1, 1]" in row["what"] and not (-1.0 <= float(value.min()) < -0.5 and float(value.max()) <= 1.0):
            bad.append(f"{key}: values outside [-1, 1] or not spanning it")
    return bad


CASES = [(stage, True, 32) for stage in STAGE_NAMES] + [("base64", False, 32), ("base64", True, 8)]


@pytest.mark.parametrize("stage,pad_to_longest,max_length", CASES)
def test_loader_batches_hold_exactly_what_contracts_documents(stage, pad_to_longest, max_length, shards_64,
                                                              token_counts):
    batch, cfg = loader_batch(shards_64.pattern, stage, pad_to_longest, max_length)
    tokens = [token_counts[k] for k in batch["key"]]  # the key names the sample it came from
    assert departures(batch, cfg, batch_table(), tokens) == []
    # The mask marks each caption's own tokens (at most max_length), the embedding is zero after them.
    assert batch["text_mask"].sum(1).tolist() == [min(n, max_length) for n in tokens]
    for i, n in enumerate(tokens):
        assert batch["text_emb"][i, min(n, max_length):].abs().sum() == 0 and batch["text_emb"][i, :n].abs().sum() > 0
    assert all(c.strip() for c in batch["caption"])


def test_the_batch_type_names_the_documented_keys():
    """data.samples.Batch (the type the loader and evaluation build) holds the documented keys and
    the loader's own `_state`, which the doc says never reaches the trainer."""
    assert set(Batch.__annotations__) == set(batch_table()) | {"_state"}
    assert "`_state`" in DOC.read_text()


def test_the_check_catches_the_old_doc(tmp_path, shards_64, token_counts):
    """The doc as it was (text float32, padded to max_length, no `key`) fails the check."""
    old = DOC.read_text().replace("| `text_emb` | float16 |", "| `text_emb` | float32 |")
    (tmp_path / "CONTRACTS.md").write_text(re.sub(r"\| `key` \|.*\n", "", old))
    batch, cfg = loader_batch(shards_64.pattern, "base64")
    found = departures(batch, cfg, batch_table(tmp_path / "CONTRACTS.md"), [token_counts[k] for k in batch["key"]])
    assert any(f.startswith("keys ") for f in found) and any(f.startswith("text_emb: torch.float16") for f in found)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_bench_imports_no_test_module():
    """bench/ scripts import the package and bench/ helpers, never a module of tests/ (nor put
    tests/ on sys.path): test scaffolding stays in tests."""
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")} | {"tests"}
    bench_modules = {p.stem for p in (REPO / "bench").glob("*.py")}
    for script in sorted((REPO / "bench").glob("*.py")):
        wrong = (_imported_modules(script) & test_modules) - bench_modules
        assert not wrong, f"{script.relative_to(REPO)} imports test modules {sorted(wrong)}"
        assert not re.search(r"""["']tests["']\)?\s*[\])]""", script.read_text()), \
            f"{script.relative_to(REPO)} puts tests/ on sys.path"
