"""CLIP score: the mean cosine similarity of image and caption embeddings (plain cosine in
[-1, 1], as the Imagen/NeMo FID-CLIP curves report it; torchmetrics' CLIPScore reports 100x
that, clipped at 0).

The model is any transformers CLIPModel folder (`save_pretrained`), with its tokenizer saved
beside it; nothing is downloaded. Images are preprocessed here exactly as transformers' CLIP
image processor does (the PIL/NumPy one, `CLIPImageProcessorPil` in transformers 5; its default
class needs torchvision): the short side resized to `size.shortest_edge` with the long side
truncated (`int(short * long / short_in)`), PIL bicubic on uint8 (so the resized image is rounded
to uint8), centre crop to `crop_size`, x * (1 / 255), then (x - mean) / std. Sizes, mean and std come
from the folder's preprocessor_config.json when present, else the model's image size and the
OpenAI CLIP mean and std. tests/test_fidelity.py checks pixel values and cosines against the
processor (docs/evaluation.md).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
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
        self.max_length = min(max_length, int(self.model.config.text_config.max_position_embeddings))
        size = int(self.model.config.vision_config.image_size)
        conf = {}
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
        self.shortest_edge = int((conf.get("size") or {}).get("shortest_edge", size))
        crop = conf.get("crop_size") or {}
        self.crop = (int(crop.get("height", size)), int(crop.get("width", size)))
        if max(self.crop) > self.shortest_edge:  # the processor would zero-pad; we do not
            raise ValueError(f"{pre}: crop_size {self.crop} does not fit in size.shortest_edge "
                             f"{self.shortest_edge}; this scorer only crops, it does not pad")
        self.resample = Image.Resampling(int(conf.get("resample", Image.Resampling.BICUBIC)))
        self.rescale_factor = float(conf.get("rescale_factor", 1 / 255))
        mean, std = conf.get("image_mean", OPENAI_CLIP_MEAN), conf.get("image_std", OPENAI_CLIP_STD)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) after the shortest-side resize: the long side is truncated, not rounded, as in
        transformers' `get_resize_output_image_size` (48x64 to short side 32 gives 32x42, not 32x43)."""
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> normalised float32 (N, 3, crop_h, crop_w) on the scorer's device."""
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        h, w = images.shape[-2:]
        nh, nw = self.resized_size(h, w)
        ch, cw = self.crop
        top, left = (nh - ch) // 2, (nw - cw) // 2
        out = []
        for image in images.cpu().permute(0, 2, 3, 1).numpy():                # (H, W, 3) uint8
            # PIL's bicubic on uint8 rounds and clips to uint8, as the processor's resize does.
            resized = np.asarray(Image.fromarray(image).resize((nw, nh), resample=self.resample))
            out.append(torch.from_numpy(resized[top:top + ch, left:left + cw].copy()))
        x = torch.stack(out).permute(0, 3, 1, 2).double() * self.rescale_factor  # (N, 3, ch, cw)
        x = (x.float() - self.mean) / self.std
        return x.to(self.device)

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
