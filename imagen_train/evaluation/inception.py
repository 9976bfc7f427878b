"""The FID Inception-v3 (the TensorFlow 2015-12-05 graph) and its input pipeline: the same numbers as
torch-fidelity's `FeatureExtractorInceptionV3` and torchmetrics' `FrechetInceptionDistance(antialias=False)`,
NOT those of pytorch-fid's full pipeline.

The network is the TF graph in torchvision's `Inception3` layout (average pools that exclude
padding in the A/C/E_1 blocks, a max pool in the last E block), as pytorch-fid, torch-fidelity
and torchmetrics all port it; on the same input the three networks agree. What tells the
published pipelines apart is the preprocessing. Ours is the TF graph's, as in torch-fidelity and
torchmetrics with antialias=False: a 299x299 TF1 bilinear resize (no half-pixel offset, no
antialiasing) and (x - 128) / 128 on uint8 values. pytorch-fid resizes with torch's bilinear
(half-pixel centres) and scales 2 * (x / 255) - 1, which moves the features and the FID. So our
FIDs are comparable with torch-fidelity's and torchmetrics' (antialias=False), and reference
statistics from another pipeline are refused (`FID_PIPELINE`, fid.FeatureStats.load).
tests/test_fidelity.py checks the agreement; docs/evaluation.md gives the measured numbers.

Parameter names follow torchvision's `Inception3`, so the ported TF weights load with
strict=True under either of their published names: pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (different files with the same keys and layout). We
write the network ourselves because torchvision would replace this project's torch build.

    net = load_fid_inception("/weights/pt_inception-2015-12-05-6726825d.pth")
    feats = net(images_uint8)   # (N, 3, H, W) uint8 -> (N, 2048) pool3 features, float32
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import MissingWeightsError, require_file

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# torch-fidelity's (and torchmetrics') copy of the same ported weights: another file, same keys.
FID_WEIGHTS_NAME_TORCH_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL_TORCH_FIDELITY = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                                  "weights-inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048
INPUT_SIZE = 299
# The label our FID statistics files carry; FeatureStats.load refuses files without it.
FID_PIPELINE = ("TF Inception-v3 2015-12-05 pool3; TF1 bilinear resize to 299; (x - 128) / 128 "
                "(= torch-fidelity, torchmetrics antialias=False; not pytorch-fid)")


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in TF) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_no_pad(x: Tensor) -> Tensor:
    # TF's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (torchvision InceptionA with the TF pool)."""

    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction block (unchanged from torchvision)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF pool)."""

    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction block (unchanged from torchvision)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions. The TF graph's first E block (Mixed_7b) average-pools
    without padding; its second (Mixed_7c) max-pools: a quirk of the 2015 graph FID depends on."""

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            pooled = _avg_pool_no_pad(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: source = dest * (in / out), no half-pixel
    offset and no antialiasing (what the 2015 graph, torch-fidelity and torchmetrics with
    antialias=False do; pytorch-fid's F.interpolate uses half-pixel centres). x: (N, C, H, W) float."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, device=x.device, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    y0, y1, wy = axis(h)
    x0, x1, wx = axis(w)
    top = x[:, :, y0, :] * (1 - wy)[:, None] + x[:, :, y1, :] * wy[:, None]   # (N, C, S, W)
    return top[..., x0] * (1 - wx) + top[..., x1] * wx                        # (N, C, S, S)


class FIDInceptionV3(nn.Module):
    """uint8 images (N, 3, H, W) -> pool3 features (N, 2048). `fc` (1008 classes) is kept only so
    the standard weights file loads with strict=True; it is not used."""

    num_features = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    @classmethod
    def random(cls, seed: int = 0) -> "FIDInceptionV3":
        """The architecture with random, scale-preserving weights (He-normal convolutions).

        PyTorch's default initialisation shrinks activations at every layer, so after 90-odd
        layers the features are ~1e-8 and every image looks alike (FID ~0). He-normal keeps them
        at order 1. For tests and offline runs without the real weights only: such FIDs track
        progress within a run and are not comparable with published numbers.
        """
        net = cls()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, nn.Conv2d):
                    fan_in = module.weight[0].numel()
                    module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
        return net.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)  # BatchNorm must always use the stored statistics

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got shape {tuple(images.shape)}")
        x = images.to(self.fc.weight.device, torch.float32)
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images in [0, 255], got {images.dtype}")
        x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128.0) / 128.0                                   # the TF graph's input scaling
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                         # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                        # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                         # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)                                                     # ... (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                            # (N, 2048) pool3


def load_fid_inception(path: Optional[str], device: str | torch.device = "cpu",
                       setting: str = "evaluation.inception_path") -> FIDInceptionV3:
    """Build the FID Inception and load the weights file at `path` with strict=True.

    A missing or unset path raises MissingWeightsError naming `setting` and where to get the file.
    BatchNorm `num_batches_tracked` counters (absent from the ported file, unused in eval) are
    filled in so that every other key must match exactly.
    """
    how = (f"the TF-Inception FID weights: pytorch-fid's {FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}) or "
           f"torch-fidelity's {FID_WEIGHTS_NAME_TORCH_FIDELITY} ({FID_WEIGHTS_URL_TORCH_FIDELITY}), the same "
           "keys; download one on a machine with network access and copy it here")
    file = require_file(path, setting, how)
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    net = FIDInceptionV3()
    state = dict(state)
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MissingWeightsError(
            f"{setting}={file} is not the FID Inception weights file ({FID_WEIGHTS_NAME} or "
            f"{FID_WEIGHTS_NAME_TORCH_FIDELITY}): "
            f"{str(err).splitlines()[0]} ...") from None
    return net.to(device).eval()


__all__ = ["FIDInceptionV3", "load_fid_inception", "resize_bilinear_tf1", "FID_PIPELINE", "FID_WEIGHTS_NAME",
           "FID_WEIGHTS_URL", "FID_WEIGHTS_NAME_TORCH_FIDELITY", "FID_WEIGHTS_URL_TORCH_FIDELITY", "FEATURE_DIM"]
