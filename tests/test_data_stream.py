"""The training data stream: sharding, epochs, exact resume, flips, uint8 storage."""

import math

import numpy as np
import pytest
import torch

import atdiff.data.stream as stream_mod
from atdiff.checkpoint import load_checkpoint, save_checkpoint
from atdiff.data import ImageShards, ImageStream, hflip, to_unit_range


def _images(n=20, c=2, h=3, w=4, seed=0):
    # distinct, left-right asymmetric images: a flipped image never equals an unflipped one
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, -1] = 0, 255
    return images


def _take(stream, k):
    return [next(stream) for _ in range(k)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_union_of_the_ranks_batches_is_the_one_process_batch(world_size):
    images, ids = _images(), np.arange(20)
    single = _take(ImageStream(images, ids, 8, seed=3), 7)  # 2 batches per epoch: crosses 3 epoch boundaries
    ranks = [_take(ImageStream(images, ids, 8, rank=r, world_size=world_size, seed=3), 7) for r in range(world_size)]
    for step, (x, y) in enumerate(single):
        parts = [ranks[r][step] for r in range(world_size)]
        assert all(px.shape[0] == 8 // world_size for px, _ in parts)
        torch.testing.assert_close(torch.cat([px for px, _ in parts]), x, rtol=0, atol=0)
        assert torch.cat([py for _, py in parts]).tolist() == y.tolist()
        assert len(set(y.tolist())) == 8  # disjoint shares


def test_each_epoch_is_a_fresh_permutation_without_repeats():
    images, ids = _images(n=20), np.arange(20)
    stream = ImageStream(images, ids, 6, seed=1, flip=False)  # 3 batches per epoch, 2 images dropped
    epochs = [torch.cat([y for _, y in _take(stream, 3)]).tolist() for _ in range(4)]
    for seen in epochs:
        assert len(seen) == 18 and len(set(seen)) == 18
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    # epoch e's order is a function of (seed, e) only
    again = ImageStream(images, ids, 6, seed=1, flip=False)
    assert torch.cat([y for _, y in _take(again, 3)]).tolist() == epochs[0]
    other = ImageStream(images, ids, 6, seed=2, flip=False)
    assert torch.cat([y for _, y in _take(other, 3)]).tolist() != epochs[0]


def test_batches_are_the_source_images_mapped_to_unit_range():
    images, ids = _images(), np.arange(20)
    for x, y in _take(ImageStream(images, ids, 5, seed=0, flip=False), 6):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, torch.from_numpy(images[y.numpy()]).float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert to_unit_range(np.array([0, 51, 255], np.uint8)).tolist() == pytest.approx([-1.0, -0.6, 1.0])


@pytest.mark.parametrize("resume_world", [1, 2])
def test_resume_gives_exactly_the_next_batches(tmp_path, resume_world):
    images, ids = _images(), np.arange(20)
    stream = ImageStream(images, ids, 8, seed=5)
    _take(stream, 3)  # mid-epoch (2 batches per epoch)
    save_checkpoint(tmp_path / "s.pt", stream=stream)
    expected = _take(stream, 5)
    resumed = [ImageStream(images, ids, 8, rank=r, world_size=resume_world, seed=5) for r in range(resume_world)]
    for r in resumed:
        load_checkpoint(tmp_path / "s.pt", stream=r)
    got = [_take(r, 5) for r in resumed]
    for step, (x, y) in enumerate(expected):
        torch.testing.assert_close(torch.cat([g[step][0] for g in got]), x, rtol=0, atol=0)
        assert torch.cat([g[step][1] for g in got]).tolist() == y.tolist()


def test_resume_refuses_another_data_set_or_seed():
    images, ids = _images(), np.arange(20)
    state = ImageStream(images, ids, 8, seed=5).state_dict()
    with pytest.raises(ValueError, match="^state: .*seed=5"):
        ImageStream(images, ids, 8, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="^state: .*n=20"):
        ImageStream(images[:19], ids[:19], 8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="^state: .*batch_size=8"):
        ImageStream(images, ids, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="^state: "):
        ImageStream(images, ids, 8, seed=5).load_state_dict({**state, "step": 2})  # only 2 batches per epoch


def test_flip_is_a_mirror_with_probability_one_half():
    images = _images(n=64)
    stream = ImageStream(images, np.arange(64), 32, seed=11)
    flipped = total = 0
    for x, y in _take(stream, 200):
        src = to_unit_range(images[y.numpy()])
        same = (x == src).flatten(1).all(1)
        mirrored = (x == src.flip(-1)).flatten(1).all(1)
        assert bool((same ^ mirrored).all())  # each output is its image or its exact mirror, never both
        flipped += int(mirrored.sum())
        total += len(y)
    # Binomial(6400, 1/2): mean 3200, sd 40; 4.5 sd leaves a false alarm probability below 1e-5
    assert abs(flipped - total / 2) <= 4.5 * math.sqrt(total / 4), flipped
    # without flips every output is the image itself
    x, y = next(ImageStream(images, np.arange(64), 32, seed=11, flip=False))
    torch.testing.assert_close(x, to_unit_range(images[y.numpy()]), rtol=0, atol=0)


def test_hflip_mirrors_only_the_chosen_images():
    images = _images(n=3)
    out = hflip(images, np.array([True, False, True]))
    assert np.array_equal(out[0], images[0, :, :, ::-1]) and np.array_equal(out[1], images[1])
    assert np.array_equal(hflip(out, np.array([True, False, True])), images)  # an involution


def test_images_stay_uint8_and_only_minibatches_become_float(tmp_path, monkeypatch):
    path = tmp_path / "imgs.npy"
    np.save(path, _images(n=40))
    mapped = np.load(path, mmap_mode="r")
    stream = ImageStream(mapped, None, 8, rank=1, world_size=2, seed=0)
    assert stream.images is mapped and stream.images.dtype == np.uint8  # no copy of the data set
    seen = []
    real = stream_mod.to_unit_range
    monkeypatch.setattr(stream_mod, "to_unit_range", lambda a: seen.append(a.shape) or real(a))
    for x, y in _take(stream, 12):
        assert y is None and x.shape == (4, 2, 3, 4)
    assert seen == [(4, 2, 3, 4)] * 12  # float conversion per local minibatch, never of the whole set


def test_shards_and_tensors_stream_like_one_array():
    images, ids = _images(n=30), np.arange(30)
    shards = ImageShards([images[:7], images[7:19], images[19:]])
    a = _take(ImageStream(images, ids, 10, seed=4), 5)
    b = _take(ImageStream(shards, ids, 10, seed=4), 5)
    c = _take(ImageStream(torch.from_numpy(images), torch.from_numpy(ids), 10, seed=4), 5)
    for (xa, ya), (xb, yb), (xc, yc) in zip(a, b, c, strict=True):
        assert torch.equal(xa, xb) and torch.equal(xa, xc) and torch.equal(ya, yb) and torch.equal(ya, yc)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 6, "world_size": 4}, "^batch_size: 6 is not divisible by world_size 4"),
    ({"batch_size": 4, "rank": 2, "world_size": 2}, "^rank: "),
    ({"batch_size": 21}, "^batch_size: "),
    ({"batch_size": 0}, "^batch_size: "),
    ({"batch_size": 4, "seed": -1}, "^seed: "),
    ({"batch_size": 4, "flip": 1}, "^flip: "),
    ({"batch_size": 4, "labels": np.arange(19)}, "^labels: expected 20 integer labels"),
    ({"batch_size": 4, "labels": np.zeros(20)}, "^labels: "),
    ({"batch_size": 4, "images": np.zeros((20, 2, 3, 4), np.float32)}, "^images: expected uint8"),
    ({"batch_size": 4, "images": np.zeros((20, 12), np.uint8)}, "^images: expected uint8"),
])
def test_bad_stream_arguments(kwargs, message):
    args = {"images": _images(), "labels": np.arange(20), **kwargs}
    with pytest.raises(ValueError, match=message):
        ImageStream(args.pop("images"), args.pop("labels"), args.pop("batch_size"), **args)
