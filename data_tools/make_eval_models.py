"""`make-eval-models`: random-weight stand-ins for the FID Inception and the CLIP model.

For rehearsing the evaluation path where the real files are not at hand (a CPU machine with no
network): `OUT/fid-inception-random.pth` has the FID Inception's layout and keys (He-normal
convolutions, random BatchNorm statistics), `OUT/clip-random/` is a tiny CLIPModel with a
character-level tokenizer. Every command that takes the real files takes these; the FID and
CLIP numbers they give only show that the path works and are comparable with nothing. For real
numbers use pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and a CLIP such as
openai/clip-vit-large-patch14 saved with save_pretrained (docs/evaluation.md).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from data_tools.common import Timer
from imagen_train.evaluation.inception import FIDInceptionV3


def random_fid_inception(path: str | Path, seed: int = 0, drop_batch_counters: bool = True) -> Path:
    """Our FID Inception with random weights and BatchNorm statistics, saved as a .pth the way the
    ported TF file is (no num_batches_tracked entries)."""
    net = FIDInceptionV3.random(seed)  # scale-preserving, so features tell images apart
    torch.manual_seed(seed)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    if drop_batch_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def random_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random-weight CLIPModel (tiny text and vision towers) and a character-level CLIP
    tokenizer (built with vocab=/merges=, which transformers 5 needs), saved to `folder`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # slow import, only here

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.!?'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


def make_eval_models(out: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write both stand-ins under `out`; returns the summary."""
    timer = Timer()
    out = Path(out)
    inception = random_fid_inception(out / "fid-inception-random.pth", seed)
    clip = random_clip(out / "clip-random", seed)
    return {"command": "make-eval-models", "inception": str(inception), "clip": str(clip), "pretrained": False,
            "note": "random weights: FID and CLIP numbers from these rehearse the path and compare with nothing",
            "seconds": round(timer.seconds, 2)}


def add_parser(sub: Any) -> None:
    """Register the `make-eval-models` subcommand."""
    p = sub.add_parser("make-eval-models", help="random stand-ins for the FID Inception and CLIP (rehearsals only)",
                       description=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.set_defaults(func=lambda a: make_eval_models(a.out, a.seed))
