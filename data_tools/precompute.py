"""`precompute-embeddings`: add T5 embeddings of every caption to a set of shards.

Each input shard becomes an output shard of the same name holding every input entry unchanged
plus `t5.npy` (float16 [n_tokens, D], valid tokens only) and `t5.json` (schema, version,
n_tokens, dim, ...): the schema in `imagen_train.data.schema`. Beside each output shard a record
`<shard>.tar.json` says which input it covers, how many samples that input held, how many were
written and which were skipped and why (`verify --inputs` checks outputs against it).

Nothing is lost on the way: an input shard that cannot be opened, or cannot be read to its end
(missing, truncated, a failed `pipe:` command), gets no output shard at all. The command goes on
with the others, then exits 1 naming each such shard; a rerun retries exactly those, since a
shard counts as done only when its tar and its record both exist. Each shard is written under a
temporary name and renamed when complete, so a killed run resumes where it stopped. Shards are
split over processes by `--rank/--world-size`, or from RANK/WORLD_SIZE set by torchrun or the
deepspeed launcher. A sample whose image does not decode or that has no caption is skipped,
counted, and named in the shard's record and in the summary.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from data_tools.common import Timer, atomic_write_bytes, progress, rate, write_tar_atomic
from imagen_train.data.schema import EMBED_KEY, EMBED_META_KEY, encode_embedding, image_key
from imagen_train.data.shards import expand_shards, iter_raw_samples
from imagen_train.text import default_dtype, load_text_encoder

MAX_NAMED = 100
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RECORD_SCHEMA = "imagen-train/precompute-record"
RECORD_VERSION = 1


def output_names(urls: list[str]) -> list[str]:
    """Output file name per input shard: its basename, or its index when basenames collide."""
    names = []
    for url in urls:
        found = re.findall(r"[^/\s:]+\.tar", url)
        names.append(found[-1] if found else "")
    if "" in names or len(set(names)) != len(names):
        return [f"{i:05d}.tar" for i in range(len(urls))]
    return names


def record_path(shard: str | Path) -> Path:
    """The record written beside an output shard: `00001.tar` -> `00001.tar.json`."""
    shard = Path(shard)
    return shard.with_name(shard.name + ".json")


def read_record(shard: str | Path) -> Optional[dict[str, Any]]:
    """An output shard's record, or None when it is missing or not one of ours."""
    try:
        record = json.loads(record_path(shard).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("schema") == RECORD_SCHEMA else None


def dist_from_env(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """(rank, world size) from the arguments, else RANK/WORLD_SIZE (torchrun, deepspeed), else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def _image_ok(sample: dict[str, Any]) -> bool:
    ext = image_key(sample)
    if ext is None:
        return False
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001 - any decode failure
        return False


@dataclass
class ShardRead:
    """One input shard as read: the samples to embed, the keys skipped (by reason), and the error
    that stopped the read (None: read to its end)."""

    url: str
    samples: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    input_samples: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    error: Optional[str] = None


def read_input_shard(url: str, retries: int, backoff_s: float) -> ShardRead:
    """Samples of one shard that have a caption and a decodable image (the rest are named)."""
    read = ShardRead(url)

    def failed(_url: str, key: str, message: str) -> None:
        read.error = f"{message} (at sample {key!r})" if key else message

    for s in iter_raw_samples(url, on_error=failed, retries=retries, backoff_s=backoff_s):
        read.input_samples += 1
        caption = s.get("txt", b"").decode("utf-8", "replace").strip()
        reason = "no_caption" if not caption else None if _image_ok(s) else "bad_image"
        if reason:
            read.skipped.setdefault(reason, []).append(s["__key__"])
        else:
            read.samples.append((s, caption))
    return read


def embed_shard(enc: Any, read: ShardRead, batch_size: int, max_length: int, bar: Any
                ) -> tuple[list[tuple[str, dict[str, bytes]]], float]:
    """(output samples, seconds in the encoder): every input entry plus the embedding entries."""
    out_samples, encode_s = [], 0.0
    for start in range(0, len(read.samples), batch_size):
        chunk = read.samples[start:start + batch_size]
        t0 = Timer()
        emb, mask = enc.encode_tokens(enc.tokenize([c for _, c in chunk], max_length))
        emb = emb.float().cpu().numpy()  # (B, L, D)
        lengths = mask.sum(1).tolist()
        encode_s += t0.seconds
        for (s, _), e, n in zip(chunk, emb, lengths):
            entries = {k: v for k, v in s.items() if not k.startswith("__")
                       and k not in (EMBED_KEY, EMBED_META_KEY)}
            entries.update(encode_embedding(e[:n], max_length=max_length, encoder=enc.name,
                                            truncated=n >= max_length))
            out_samples.append((s["__key__"], entries))
        bar.update(len(chunk))
    return out_samples, encode_s


def write_output_shard(path: Path, read: ShardRead, samples: list[tuple[str, dict[str, bytes]]],
                       info: dict[str, Any]) -> None:
    """The shard, then its record: a shard is done only when both exist (the record comes last)."""
    write_tar_atomic(path, samples)
    record = {"schema": RECORD_SCHEMA, "version": RECORD_VERSION, "input": read.url,
              "input_samples": read.input_samples, "output_samples": len(samples),
              "skipped": {k: len(v) for k, v in read.skipped.items()}, "skipped_keys": read.skipped, **info}
    atomic_write_bytes(record_path(path), json.dumps(record, indent=1).encode())


def is_done(path: Path) -> bool:
    """An output shard finished by an earlier run: its tar and its record both exist."""
    return path.is_file() and read_record(path) is not None


def precompute_embeddings(shards: str | list[str], encoder: str, out: str | Path, max_length: int = 128,
                          batch_size: int = 64, device: Optional[str] = None, dtype: str = "auto",
                          rank: Optional[int] = None, world_size: Optional[int] = None,
                          local_files_only: bool = True, progress_bar: bool = True,
                          read_retries: int = 2, retry_backoff_s: float = 1.0) -> dict[str, Any]:
    """Embed the captions of this rank's shards into `out`; returns the summary dict (`ok` is
    False when an input shard could not be read to its end: it has no output, a rerun retries it)."""
    urls = expand_shards(shards)
    names = output_names(urls)
    rank, world_size = dist_from_env(rank, world_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = [(u, n) for i, (u, n) in enumerate(zip(urls, names)) if i % world_size == rank]
    todo = [(u, n) for u, n in mine if not is_done(out / n)]
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    torch_dtype = default_dtype(device) if dtype == "auto" else DTYPES[dtype]
    timer = Timer()
    enc = load_text_encoder(encoder, device, torch_dtype, max_length, local_files_only) if todo else None
    load_s = timer.seconds
    info = {"encoder": str(encoder), "max_length": max_length, "embed_dim": enc.embed_dim if enc else None}
    reads: list[ShardRead] = []
    written_samples, written_shards, encode_s = 0, 0, 0.0

    # Reading (and decoding to check) the next shard and writing the previous one run in
    # background threads while the encoder works on the current one; PIL, tar I/O and torch
    # release the GIL, so on a GPU node the I/O hides behind the encoder.
    def read(url: str) -> ShardRead:
        return read_input_shard(url, read_retries, retry_backoff_s)

    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer, \
            progress(None, f"precompute rank {rank}", progress_bar) as bar:
        pending_read = reader.submit(read, todo[0][0]) if todo else None
        pending_write = None
        for done, (url, name) in enumerate(todo):
            shard = pending_read.result()
            reads.append(shard)
            if done + 1 < len(todo):
                pending_read = reader.submit(read, todo[done + 1][0])
            if shard.error is None:
                samples, seconds = embed_shard(enc, shard, batch_size, max_length, bar)
                encode_s += seconds
                if pending_write is not None:
                    pending_write.result()  # one shard in flight at a time; raises a write error here
                pending_write = writer.submit(write_output_shard, out / name, shard, samples, info)
                written_samples += len(samples)
                written_shards += 1
            if done == 0 and len(todo) > 1:
                bar.total = len(shard.samples) * len(todo)  # estimate, for the ETA
            bar.set_postfix(shards=f"{done + 1}/{len(todo)}")
        if pending_write is not None:
            pending_write.result()
    return _summary(out, rank, world_size, mine, todo, reads, written_shards, written_samples, info,
                    device, torch_dtype, timer.seconds, load_s, encode_s)


def _summary(out: Path, rank: int, world_size: int, mine: list, todo: list, reads: list[ShardRead],
             written_shards: int, written_samples: int, info: dict[str, Any], device: Any, dtype: Any,
             seconds: float, load_s: float, encode_s: float) -> dict[str, Any]:
    """The JSON summary; failed shards are also named on stderr, where a launcher's log shows them."""
    failed = [{"shard": r.url, "problem": r.error, "samples_read_before": r.input_samples}
              for r in reads if r.error is not None]
    counts: dict[str, int] = {}
    named: dict[str, list[str]] = {}
    for r in reads:
        if r.error is None:
            for reason, keys in r.skipped.items():
                counts[reason] = counts.get(reason, 0) + len(keys)
                named.setdefault(reason, []).extend(f"{r.url}:{k}" for k in keys)
    for f in failed:
        print(f"precompute-embeddings: input shard {f['shard']} could not be read to its end ({f['problem']}); "
              f"it has no output shard and a rerun retries it", file=sys.stderr, flush=True)
    return {"command": "precompute-embeddings", "ok": not failed, "out": str(out), "rank": rank,
            "world_size": world_size, "shards_assigned": len(mine), "shards_written": written_shards,
            "shards_skipped_existing": len(mine) - len(todo), "shards_failed": len(failed),
            "failed_shards": failed, "input_samples": sum(r.input_samples for r in reads if r.error is None),
            "samples_written": written_samples, "skipped": counts,
            "skipped_samples": {k: v[:MAX_NAMED] for k, v in named.items()}, **info, "device": str(device),
            "dtype": str(dtype), "seconds": round(seconds, 2), "load_seconds": round(load_s, 2),
            "encoder_seconds": round(encode_s, 2), "samples_per_s": rate(written_samples, seconds - load_s)}


def add_parser(sub: Any) -> None:
    """Register the `precompute-embeddings` subcommand."""
    p = sub.add_parser("precompute-embeddings", help="add T5 embeddings (t5.npy + t5.json) to shards",
                       description=__doc__)
    p.add_argument("--shards", required=True, help="brace pattern, list file or `::`-joined shards")
    p.add_argument("--encoder", required=True, help="local save_pretrained folder of a T5 encoder + tokenizer")
    p.add_argument("--out", required=True, help="output folder (same shard names)")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per caption")
    p.add_argument("--batch-size", type=int, default=64, help="captions per encoder forward")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: bf16 (or fp16) on a GPU, fp32 on a CPU")
    p.add_argument("--rank", type=int, default=None, help="this process's index (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="processes in all (default: $WORLD_SIZE or 1)")
    p.add_argument("--allow-download", action="store_true",
                   help="let transformers fetch a hub name (default: local files only)")
    p.add_argument("--read-retries", type=int, default=2,
                   help="retries of an input shard whose read fails (I/O error, broken remote stream)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda a: precompute_embeddings(
        a.shards, a.encoder, a.out, a.max_length, a.batch_size, a.device, a.dtype, a.rank, a.world_size,
        not a.allow_download, not a.no_progress, a.read_retries))
