import pickle

import numpy as np
import pytest
import torch

from atdiff.data import load_cifar10, load_imagenet64_npz, pad_to, to_unit_range


def _write_cifar(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {b"data": images.reshape(n, -1), b"labels": [(i + j) % 10 for j in range(n)]}
        (root / name).write_bytes(pickle.dumps(batch))
    return images


def test_cifar10_reader_keeps_pixels_channels_and_labels(tmp_path):
    images = _write_cifar(tmp_path)
    x, y = load_cifar10(tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    # pixel (c, h, w) of the file lands at the same (c, h, w); 0 -> -1, 255 -> 1
    torch.testing.assert_close(x[:4], torch.from_numpy(images.astype(np.float32) / 127.5 - 1))
    assert y[:4].tolist() == [0, 1, 2, 3] and y[4:8].tolist() == [1, 2, 3, 4]
    xt, _ = load_cifar10(tmp_path, train=False)
    assert xt.shape[0] == 4
    assert to_unit_range(np.array([0, 255])).tolist() == [-1.0, 1.0]


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="^root[:,]"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="^root[:,]"):
        load_cifar10(tmp_path)


def test_imagenet64_npz_reader(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 3, 64, 64), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", data=images.reshape(3, -1), labels=np.array([1, 1000, 5]))
    np.savez(tmp_path / "b.npz", data=images.transpose(0, 2, 3, 1), labels=np.array([2, 3, 4]))
    x, y = load_imagenet64_npz([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert y.tolist() == [0, 999, 4, 1, 2, 3]
    torch.testing.assert_close(x[:3], x[3:])  # both layouts give the same images
    assert x[0, 2, 5, 7].item() == pytest.approx(images[0, 2, 5, 7] / 127.5 - 1)
    np.savez(tmp_path / "bad.npz", data=images.reshape(3, -1), labels=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="^paths: .*labels outside"):
        load_imagenet64_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", data=np.zeros((2, 100), np.uint8), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="^paths: .*expected rows of 12288"):
        load_imagenet64_npz(tmp_path / "bad2.npz")


def test_pad_to():
    x = torch.zeros(2, 1, 28, 28)
    y = pad_to(x, 32)
    assert y.shape == (2, 1, 32, 32)
    assert y[0, 0, 0, 0] == -1 and y[0, 0, 30, 29] == -1  # padding is black
    assert y[0, 0, 2, 2] == 0 and y[0, 0, 29, 29] == 0  # the image sits in the centre
    with pytest.raises(ValueError, match="^size[:,]"):
        pad_to(x, 16)
