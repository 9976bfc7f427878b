"""CLIP score: the mean cosine similarity of image and caption embeddings (plain cosine in
[-1, 1], as the Imagen/NeMo FID-CLIP curves report it; torchmetrics' CLIPScore reports 100x
that, clipped at 0).

The model is any transformers CLIPModel folder (`save_pretrained`), with its tokenizer saved
beside it; nothing is downloaded. Images are preprocessed here (resize the short side bicubic,
center crop, CLIP normalisation from the folder's preprocessor_config.json if present), which
avoids the image-processor classes that need torchvision in transformers 5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .weights import require_file

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HOW_TO = ("a transformers CLIPModel and its tokenizer saved with save_pretrained (e.g. on a machine "
               "with network access: CLIPModel.from_pretrained('openai/clip-vit-large-patch14')"
               ".save_pretrained(DIR) and CLIPProcessor.from_pretrained(same).save_pretrained(DIR), then "
               "copy DIR here)")


class ClipScorer:
    """Embeds images and captions with a local CLIPModel; `cosine(images, captions)` -> (N,)."""

    def __init__(self, path: Optional[str], device: str | torch.device = "cpu",
                 setting: str = "evaluation.clip_path", max_length: int = 77):
        from transformers import AutoTokenizer, CLIPModel  # slow import, only here

        folder = require_file(path, setting, CLIP_HOW_TO, folder=True)
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(f"{setting}={path} does not hold {CLIP_HOW_TO}: {err}") from None
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        vision = self.model.config.vision_config
        self.image_size = int(vision.image_size)
        self.max_length = min(max_length, int(self.model.config.text_config.max_position_embeddings))
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> normalised float (N, 3, S, S) at the model's image size."""
        x = images.to(self.device, torch.float32) / 255.0
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        nh, nw = max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0, 1)
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        x = x[..., top:top + self.image_size, left:left + self.image_size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings (N, E)."""
        out = self.model.vision_model(pixel_values=self.preprocess(images))
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> Tensor:
        """L2-normalised caption embeddings (N, E)."""
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def cosine(self, images: Tensor, captions: Sequence[str], batch_size: int = 32) -> Tensor:
        """Per-pair cosine similarity (N,) of uint8 images (N, 3, H, W) and their captions."""
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        sims = []
        for i in range(0, len(captions), batch_size):
            img = self.image_features(images[i:i + batch_size])
            txt = self.text_features(captions[i:i + batch_size])
            sims.append((img * txt).sum(-1).cpu())
        return torch.cat(sims) if sims else torch.zeros(0)


__all__ = ["ClipScorer", "CLIP_HOW_TO"]
