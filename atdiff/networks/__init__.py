"""Networks: a time-conditioned MLP for toy data and the ADM UNet for images."""

from .mlp import MLP
from .unet import UNet, unet_cifar10, unet_cifar10_adm, unet_imagenet64, unet_small

__all__ = ["MLP", "UNet", "unet_cifar10", "unet_cifar10_adm", "unet_imagenet64", "unet_small"]
