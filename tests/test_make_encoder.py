"""`data_tools make-encoder`: a random T5 whose tokenizer is trained on the shards' captions."""

import json

import torch

from data_tools.__main__ import main


def test_make_encoder_from_shard_captions(tmp_path, shards_64, capsys):
    out = tmp_path / "enc"
    assert main(["make-encoder", "--shards", shards_64.pattern, "--out", str(out), "--d-model", "32",
                 "--num-layers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["captions"] == shards_64.num_samples and summary["pretrained"] is False
    from imagen_train.text import load_text_encoder
    encoder = load_text_encoder(out, "cpu", torch.float32, max_length=16)
    emb, mask = encoder.encode(["a large red circle at the center", "a small blue square at the top left"],
                               max_length=16, pad_to_max_length=True)
    assert emb.shape == (2, 16, 32) and mask.dtype == torch.bool
    assert mask.sum(1).min() >= 3  # real tokens, not one unknown token per caption
    # Mostly whole words (7 and 8 words + EOS), not characters (~30 pieces each).
    assert mask.sum(1).max() <= 12, mask.sum(1)
    assert not torch.allclose(emb[0, :3], emb[1, :3])
