"""Loading a frozen T5 encoder (any HF `save_pretrained` folder) and encoding captions.

Used by `data_tools precompute-embeddings` and at sampling time. Nothing here downloads unless
asked: `local_files_only=True` is the default, so a missing folder is an error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch


# `from_pretrained(dtype=...)` arrived in transformers 4.56 (huggingface/transformers#39782, which
# renamed `torch_dtype`); older versions refuse it. requirements.txt states the same floor (a test
# checks that they agree).
MIN_TRANSFORMERS = (4, 56)


class TextEncoderError(ValueError):
    """The text encoder folder is missing or does not hold a T5 encoder and tokenizer."""


def check_transformers_version(version: str) -> None:
    """Refuse a transformers release older than MIN_TRANSFORMERS, naming both versions."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"  # "0rc1" -> 0
        parts.append(int(digits))
    if tuple(parts) < MIN_TRANSFORMERS:
        floor = ".".join(map(str, MIN_TRANSFORMERS))
        raise TextEncoderError(f"transformers {version} is too old: imagen-train needs >= {floor} "
                               f"(pip install 'transformers>={floor}')")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU that has it (T5 overflows in fp16), else fp16 on a GPU, fp32 on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TextEncoder:
    """A frozen T5 encoder with its tokenizer; `encode(texts)` -> (emb (B, L, D), mask (B, L))."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, max_length: int = 128):
        self.model, self.tokenizer, self.name, self.max_length = model, tokenizer, name, max_length

    @property
    def embed_dim(self) -> int:
        """Width D of the embeddings (T5's d_model)."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str], max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, truncated to `max_length` and padded to the longest."""
        return self.tokenizer(list(texts), max_length=max_length or self.max_length, truncation=True,
                              padding="longest", return_tensors="pt")

    @torch.no_grad()
    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder on tokenized input; returns (emb (B, L, D) float, mask (B, L) bool)."""
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device).bool()
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        emb = emb.masked_fill(~mask[..., None], 0.0)  # padding positions carry no signal
        return emb, mask

    def encode(self, texts: Sequence[str], max_length: Optional[int] = None,
               pad_to_max_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions: (emb (B, L, D), mask (B, L) bool); L = longest, or max_length if padded."""
        emb, mask = self.encode_tokens(self.tokenize(texts, max_length))
        if pad_to_max_length:
            length = max_length or self.max_length
            emb = torch.nn.functional.pad(emb, (0, 0, 0, length - emb.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
        return emb, mask


def load_text_encoder(path: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: Optional[torch.dtype] = None, max_length: int = 128,
                      local_files_only: bool = True) -> TextEncoder:
    """Load a T5 encoder + tokenizer from a save_pretrained folder (or hub name if allowed)."""
    import transformers  # seconds to import: only loading an encoder pays for it, not `import imagen_train.text`
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    check_transformers_version(transformers.__version__)
    path_str = str(path)
    if local_files_only and not Path(path_str).is_dir():
        raise TextEncoderError(f"text encoder folder not found: {path_str} (give a local "
                               "save_pretrained folder, or allow downloads)")
    try:
        config = AutoConfig.from_pretrained(path_str, local_files_only=local_files_only)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds
        raise TextEncoderError(f"{path_str} has no readable model config: {err}") from None
    if getattr(config, "model_type", None) not in ("t5", "umt5", "mt5"):
        raise TextEncoderError(f"{path_str} holds a {getattr(config, 'model_type', '?')!r} model, "
                               "not a T5 encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_str, local_files_only=local_files_only)
        model = T5EncoderModel.from_pretrained(path_str, local_files_only=local_files_only,
                                               dtype=dtype or default_dtype(device))
    except Exception as err:  # noqa: BLE001
        raise TextEncoderError(f"cannot load the T5 encoder or tokenizer from {path_str}: {err}") from None
    model.to(device).eval().requires_grad_(False)
    return TextEncoder(model, tokenizer, name=path_str, max_length=max_length)
