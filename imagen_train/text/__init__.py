"""Frozen text encoder (T5) loading and caption encoding."""

from imagen_train.text.t5 import TextEncoder, TextEncoderError, default_dtype, load_text_encoder

__all__ = ["TextEncoder", "TextEncoderError", "default_dtype", "load_text_encoder"]
