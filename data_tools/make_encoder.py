"""`make-encoder`: a small random-weight T5 encoder with a tokenizer trained on your captions.

For trying the pipeline where no pre-trained T5 is at hand (a CPU machine with no network).
The encoder is NOT pre-trained: its embeddings are a fixed random function of the tokens. For
real training point `precompute-embeddings --encoder` at a T5 folder instead (e.g. a local copy
of google/t5-v1_1-xxl saved with save_pretrained).
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

from data_tools.common import Timer
from imagen_train.data import iter_shard_samples
from imagen_train.text.tiny import build_tiny_t5


def captions_of(shards: str, limit: int) -> list[str]:
    """Up to `limit` captions (`txt` entries) from the shards, in order."""
    captions: list[str] = []
    with closing(iter_shard_samples(shards, keep=lambda ext: ext == "txt")) as stream:
        for sample in stream:
            text = sample.get("txt", b"").decode("utf-8", "replace").strip()
            if text:
                captions.append(text)
            if len(captions) >= limit:
                break
    return captions


def make_encoder(shards: str, out: str | Path, d_model: int, num_layers: int, vocab_size: int,
                 seed: int, max_captions: int = 20_000) -> dict[str, Any]:
    timer = Timer()
    captions = captions_of(shards, max_captions)
    if not captions:
        raise SystemExit(f"make-encoder: no captions (txt entries) found in {shards}")
    folder = build_tiny_t5(out, d_model=d_model, num_layers=num_layers, seed=seed,
                           sentences=captions, vocab_size=vocab_size)
    return {"command": "make-encoder", "out": str(folder), "captions": len(captions),
            "d_model": d_model, "num_layers": num_layers, "pretrained": False,
            "seconds": round(timer.seconds, 2)}


def add_parser(sub: Any) -> None:
    """Register the `make-encoder` subcommand."""
    p = sub.add_parser("make-encoder", help="build a small random T5 encoder + tokenizer trained on captions",
                       description=__doc__)
    p.add_argument("--shards", required=True, help="shards whose captions train the tokenizer")
    p.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    p.add_argument("--d-model", type=int, default=64, help="embedding width")
    p.add_argument("--num-layers", type=int, default=2, help="encoder layers")
    p.add_argument("--vocab-size", type=int, default=256, help="SentencePiece BPE vocabulary (a soft limit)")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.set_defaults(func=lambda a: make_encoder(a.shards, a.out, a.d_model, a.num_layers, a.vocab_size, a.seed))
