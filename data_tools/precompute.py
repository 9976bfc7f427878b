"""`precompute-embeddings`: add T5 embeddings of every caption to a set of shards.

Each input shard becomes an output shard of the same name holding every input entry unchanged
plus `t5.npy` (float16 [n_tokens, D], valid tokens only) and `t5.json` (schema, version,
n_tokens, dim, ...): the schema in `imagen_train.data.schema`. Finished output shards are
skipped, so a killed run resumes where it stopped; each shard is written under a temporary name
and renamed when complete. Shards are split over processes by `--rank/--world-size`, or from
RANK/WORLD_SIZE set by torchrun or the deepspeed launcher. A sample whose image does not decode
or that has no caption is skipped, counted and named in the summary.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
import re
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from data_tools.common import Timer, progress, rate, write_tar_atomic
from imagen_train.data.schema import EMBED_KEY, EMBED_META_KEY, encode_embedding, image_key
from imagen_train.data.shards import expand_shards, iter_raw_samples
from imagen_train.text import default_dtype, load_text_encoder

MAX_NAMED = 100
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def output_names(urls: list[str]) -> list[str]:
    """Output file name per input shard: its basename, or its index when basenames collide."""
    names = []
    for url in urls:
        found = re.findall(r"[^/\s:]+\.tar", url)
        names.append(found[-1] if found else "")
    if "" in names or len(set(names)) != len(names):
        return [f"{i:05d}.tar" for i in range(len(urls))]
    return names


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


def precompute_embeddings(shards: str | list[str], encoder: str, out: str | Path, max_length: int = 128,
                          batch_size: int = 64, device: Optional[str] = None, dtype: str = "auto",
                          rank: Optional[int] = None, world_size: Optional[int] = None,
                          local_files_only: bool = True, progress_bar: bool = True) -> dict[str, Any]:
    """Embed the captions of this rank's shards into `out`; returns the summary dict."""
    urls = expand_shards(shards)
    names = output_names(urls)
    rank, world_size = dist_from_env(rank, world_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = [(u, n) for i, (u, n) in enumerate(zip(urls, names)) if i % world_size == rank]
    todo = [(u, n) for u, n in mine if not (out / n).exists()]
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    torch_dtype = default_dtype(device) if dtype == "auto" else DTYPES[dtype]
    timer = Timer()
    counts: dict[str, int] = {}
    named: dict[str, list[str]] = {}
    written_samples = 0
    encode_s = 0.0

    def skip(reason: str, name: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        if len(named.setdefault(reason, [])) < MAX_NAMED:
            named[reason].append(name)

    enc = load_text_encoder(encoder, device, torch_dtype, max_length, local_files_only) if todo else None
    load_s = timer.seconds

    def read_shard(url: str) -> list[tuple[dict[str, Any], str]]:
        """Samples of one shard that have a caption and a decodable image (the rest are counted)."""
        samples = []
        for s in iter_raw_samples(url, on_error=lambda u, k, m: skip("bad_shard", f"{u}:{k} {m}".strip())):
            sid = f"{url}:{s['__key__']}"
            caption = s.get("txt", b"").decode("utf-8", "replace").strip()
            if not caption:
                skip("no_caption", sid)
            elif not _image_ok(s):
                skip("bad_image", sid)
            else:
                samples.append((s, caption))
        return samples

    # Reading (and decoding to check) the next shard and writing the previous one run in
    # background threads while the encoder works on the current one; PIL, tar I/O and torch
    # release the GIL, so on a GPU node the I/O hides behind the encoder.
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer, \
            progress(None, f"precompute rank {rank}", progress_bar) as bar:
        pending_read = reader.submit(read_shard, todo[0][0]) if todo else None
        pending_write = None
        for done, (url, name) in enumerate(todo):
            samples = pending_read.result()
            if done + 1 < len(todo):
                pending_read = reader.submit(read_shard, todo[done + 1][0])
            out_samples = []
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                t0 = Timer()
                emb, mask = enc.encode_tokens(enc.tokenize([c for _, c in chunk], max_length))
                emb = emb.float().cpu().numpy()
                lengths = mask.sum(1).tolist()
                encode_s += t0.seconds
                for (s, _), e, n in zip(chunk, emb, lengths):
                    entries = {k: v for k, v in s.items() if not k.startswith("__")
                               and k not in (EMBED_KEY, EMBED_META_KEY)}
                    entries.update(encode_embedding(e[:n], max_length=max_length, encoder=enc.name,
                                                    truncated=n >= max_length))
                    out_samples.append((s["__key__"], entries))
                bar.update(len(chunk))
            if pending_write is not None:
                pending_write.result()  # one shard in flight at a time; raises a write error here
            pending_write = writer.submit(write_tar_atomic, out / name, out_samples)
            written_samples += len(out_samples)
            if done == 0 and len(todo) > 1:
                bar.total = len(samples) * len(todo)  # estimate, for the ETA
            bar.set_postfix(shards=f"{done + 1}/{len(todo)}")
        if pending_write is not None:
            pending_write.result()
    seconds = timer.seconds
    return {"command": "precompute-embeddings", "out": str(out), "rank": rank, "world_size": world_size,
            "shards_assigned": len(mine), "shards_written": len(todo),
            "shards_skipped_existing": len(mine) - len(todo), "samples_written": written_samples,
            "skipped": counts, "skipped_samples": named, "encoder": str(encoder),
            "embed_dim": enc.embed_dim if enc else None, "device": str(device), "dtype": str(torch_dtype),
            "max_length": max_length, "seconds": round(seconds, 2), "load_seconds": round(load_s, 2),
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda a: precompute_embeddings(
        a.shards, a.encoder, a.out, a.max_length, a.batch_size, a.device, a.dtype, a.rank, a.world_size,
        not a.allow_download, not a.no_progress))
