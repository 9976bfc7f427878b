"""T5 loading and encoding (imagen_train.text) with the tiny offline encoder."""

from __future__ import annotations

import json

import pytest
import torch

from imagen_train.text import TextEncoderError, load_text_encoder


def test_encode_shapes_mask_and_padding(tiny_t5_dir):
    enc = load_text_encoder(tiny_t5_dir, "cpu", torch.float32, max_length=16)
    texts = ["a small red circle at the top left", "a blue square"]
    emb, mask = enc.encode(texts)
    assert emb.shape[0] == 2 and emb.shape[2] == enc.embed_dim == 64 and mask.dtype == torch.bool
    assert mask[0].all() and mask[1].sum() < mask[0].sum()
    assert (emb[1][~mask[1]] == 0).all()  # padding carries nothing
    # A caption's valid tokens do not depend on what it is batched with.
    alone, _ = enc.encode(texts[1:])
    torch.testing.assert_close(emb[1, : mask[1].sum()], alone[0], rtol=1e-4, atol=1e-5)
    emb, mask = enc.encode(texts, pad_to_max_length=True)
    assert emb.shape == (2, 16, 64) and mask.shape == (2, 16)
    emb, mask = enc.encode(["red " * 100], max_length=8)
    assert mask.sum() == 8  # truncated to max_length


def test_missing_or_wrong_folder_names_the_path(tmp_path):
    with pytest.raises(TextEncoderError, match=str(tmp_path / "nope")):
        load_text_encoder(tmp_path / "nope")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TextEncoderError, match="not a T5"):
        load_text_encoder(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match=str(tmp_path / "empty")):
        load_text_encoder(tmp_path / "empty")


def test_transformers_floor_matches_requirements_and_is_checked(monkeypatch, tiny_t5_dir):
    """requirements.txt and the code name the same floor: from_pretrained(dtype=) needs 4.56."""
    from pathlib import Path

    import transformers

    from imagen_train.text.t5 import MIN_TRANSFORMERS, check_transformers_version

    floor = ".".join(map(str, MIN_TRANSFORMERS))
    lines = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text().splitlines()
    assert f"transformers>={floor}" in lines
    check_transformers_version(transformers.__version__)  # the installed one passes
    for ok in ("4.56.0", "4.56.2", "4.57.0rc1", "5.24.0"):
        check_transformers_version(ok)
    monkeypatch.setattr(transformers, "__version__", "4.55.4")
    with pytest.raises(TextEncoderError, match=r"transformers 4.55.4 is too old.*>= 4.56"):
        load_text_encoder(tiny_t5_dir, "cpu", torch.float32)
