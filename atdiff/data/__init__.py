"""Data: readers that keep images as uint8 ``(N, C, H, W)`` with int64 labels, and a seeded, sharded, infinite
minibatch stream that converts to float32 in ``[-1, 1]`` one batch at a time (see :mod:`atdiff.data.readers`,
:mod:`atdiff.data.stream`)."""

from atdiff.data.checks import check_labels, check_pixels
from atdiff.data.readers import (
    IMAGE_SUFFIXES,
    ImageShards,
    list_image_folder,
    load_cifar10,
    load_digits,
    load_imagenet64_npz,
    load_mnist5k,
    pad_to,
    read_cifar10,
    read_digits,
    read_image_folder,
    read_imagenet64_npz,
    read_mnist5k,
    to_unit_range,
)
from atdiff.data.safe_pickle import safe_load_pickle
from atdiff.data.stream import ImageStream, hflip

__all__ = ["IMAGE_SUFFIXES", "ImageShards", "ImageStream", "check_labels", "check_pixels", "hflip",
           "list_image_folder", "load_cifar10", "load_digits", "load_imagenet64_npz", "load_mnist5k", "pad_to",
           "read_cifar10", "read_digits", "read_image_folder", "read_imagenet64_npz", "read_mnist5k",
           "safe_load_pickle", "to_unit_range"]
