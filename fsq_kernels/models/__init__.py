"""Models of the FSQ image pipeline: tokenizer (FSQ autoencoder + PatchGAN), MaskGIT, and the small
classifier used for evaluation. They use the quantizer only through ``fsq_kernels.FSQ``."""

from .classifier import SmallClassifier, frechet_distance
from .maskgit import MaskGIT, cosine_schedule, maskgit_loss, maskgit_sample, random_mask, train_mask_ratio
from .tokenizer import (
    FSQTokenizer,
    PatchDiscriminator,
    VGGPerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)

__all__ = [
    "FSQTokenizer", "PatchDiscriminator", "VGGPerceptualLoss", "adaptive_weight", "hinge_d_loss",
    "hinge_g_loss", "reconstruction_loss", "MaskGIT", "cosine_schedule", "train_mask_ratio", "random_mask",
    "maskgit_loss", "maskgit_sample", "SmallClassifier", "frechet_distance",
]
