"""Models of the FSQ image pipeline: tokenizer (FSQ autoencoder), its PatchGAN discriminator and
losses, MaskGIT, and the small classifier used for evaluation. They use the quantizer only through
``fsq_kernels.FSQ``. Exports (``fsq-train export``) load back with ``FSQTokenizer.from_pretrained``
and ``MaskGIT.from_pretrained``."""

from .classifier import SmallClassifier
from .discriminator import PatchDiscriminator
from .losses import VGGPerceptualLoss, adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from .maskgit import MaskGIT, cosine_schedule, maskgit_loss, maskgit_sample, random_mask, train_mask_ratio
from .pretrained import PretrainedError
from .tokenizer import FSQTokenizer

__all__ = [
    "FSQTokenizer", "PatchDiscriminator", "VGGPerceptualLoss", "adaptive_weight", "hinge_d_loss",
    "hinge_g_loss", "reconstruction_loss", "MaskGIT", "cosine_schedule", "train_mask_ratio", "random_mask",
    "maskgit_loss", "maskgit_sample", "SmallClassifier", "PretrainedError",
]
