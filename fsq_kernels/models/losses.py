"""Losses of the tokenizer: L1 / L2 reconstruction, an optional perceptual (LPIPS-style, VGG16
features) loss whose weights come only from a local file, the PatchGAN hinge losses and the VQGAN
adaptive weight (norm of the reconstruction gradient over the norm of the GAN gradient at the
decoder's last layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VGGPerceptualLoss", "hinge_d_loss", "hinge_g_loss", "adaptive_weight", "reconstruction_loss"]


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def reconstruction_loss(x: Tensor, y: Tensor, kind: str = "l1") -> Tensor:
    if kind == "l1":
        return (x - y).abs().mean()
    if kind == "l2":
        return (x - y).pow(2).mean()
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2'; got {kind!r}")


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's lambda = ||grad_L(rec)|| / (||grad_L(gan)|| + 1e-4), clamped, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


# VGG16 "features" indices (torchvision layout) and the ReLU outputs LPIPS uses.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class VGGPerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance on VGG16 features, loaded only from a local file.

    ``weights_path`` is a state dict saved with torch.save whose ``features.N.weight/bias`` keys
    follow torchvision's vgg16 layout (a full torchvision vgg16 state dict works; classifier keys
    are ignored). Optional ``lin{k}.weight`` keys (LPIPS's learned 1x1 heads, shape (1, C, 1, 1))
    are used when present; otherwise every channel weighs the same. Nothing is downloaded.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"perceptual loss weights file {weights_path!r} not found "
                                    "(the perceptual loss only reads a local file)") from e
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = self.load_state_dict(feats, strict=False).missing_keys
        if any(k.startswith("features.") for k in missing):
            raise ValueError(f"{weights_path!r} lacks VGG16 feature weights: missing {missing[:4]}...")
        chans = [64, 128, 256, 512, 512]
        self.lins = nn.ParameterList()
        for k, ch in enumerate(chans):
            w = state.get(f"lin{k}.weight", state.get(f"lin{k}.model.1.weight"))
            self.lins.append(nn.Parameter(w.reshape(1, ch, 1, 1).float() if w is not None else torch.ones(1, ch, 1, 1),
                                          requires_grad=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y in [-1, 1]; returns the mean distance (a scalar)."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = h.new_zeros(())
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                fx, fy = h.chunk(2)
                fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + ((fx - fy).pow(2) * self.lins[k]).sum(1).mean()
                k += 1
                if k == len(_LPIPS_TAPS):
                    break
        return total
