"""A small, randomly initialised T5 encoder with a SentencePiece tokenizer trained on given text.

For tests and the CPU quickstart, where no pre-trained T5 can be downloaded. Its embeddings are
a fixed random function of the tokens: enough for a diffusion model to tell captions apart,
nothing like a pre-trained T5's language understanding.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm
import torch

_DEFAULT_WORDS = ("a small large red green blue yellow purple orange white black circle square "
                  "triangle star shape at the top bottom left right center in on of dark light "
                  "background picture photo image dog cat tree car house with and").split()


def build_tiny_t5(folder: str | Path, d_model: int = 64, num_layers: int = 2, seed: int = 0,
                  sentences: Optional[Iterable[str]] = None, vocab_size: int = 96,
                  model_type: str = "bpe") -> Path:
    """Write a random-weight T5EncoderModel and a freshly trained T5 tokenizer to `folder`.

    `sentences` trains the tokenizer (default: random sentences over a small vocabulary). BPE is
    the default because it keeps each word of a small closed vocabulary as one token (why not
    unigram: docs/design-notes.md). T5's special ids are kept: pad 0, eos 1, unk 2, no bos.
    transformers 5 ignores `T5Tokenizer(vocab_file=...)`, so the SentencePiece model is trained
    into a folder and the tokenizer loaded from it with `from_pretrained`.
    """
    # transformers takes seconds to import; the data_tools CLI imports this module for every command.
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    spm_dir = folder.parent / (folder.name + "-spm")
    spm_dir.mkdir(parents=True, exist_ok=True)
    if sentences is None:
        rng = random.Random(seed)
        sentences = [" ".join(rng.choice(_DEFAULT_WORDS) for _ in range(rng.randint(3, 12)))
                     for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_prefix=str(spm_dir / "spiece"),
        vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        model_type=model_type, minloglevel=2)
    tokenizer = T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=4, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
