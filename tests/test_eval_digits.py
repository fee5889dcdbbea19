"""The offline digits metric: a deterministic, cached LeNet whose features separate real digits from blurred
digits, digits missing a class and noise, each far beyond the real-vs-real floor and in that order."""

import numpy as np
import pytest
import scipy.ndimage
import torch

from atdiff.eval.classifier import ClassifierSettings, get_classifier, train_classifier
from atdiff.eval.features import classifier_extractor, compute_metrics, load_reference_dataset

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return load_reference_dataset("digits")


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return classifier_extractor("digits", cache_dir=tmp_path_factory.mktemp("cache"))


def blur(images, sigma):
    out = scipy.ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_digits_metric_separates_and_ranks_degradations(digits, extractor):
    images, labels = digits
    assert extractor.info["classifier_test_accuracy"] > 0.95
    order = np.random.default_rng(0).permutation(len(images))
    ref, held = order[: len(images) // 2], order[len(images) // 2:]
    real, _ = extractor.outputs(images[ref], False)
    cases = {
        "floor (real half vs real half)": images[held],
        "one class removed (0)": images[held][labels[held] != 0],
        "blurred (sigma 0.5 px)": blur(images[held], 0.5),
        "uniform noise": np.random.default_rng(1).integers(0, 256, images[held].shape, dtype=np.uint8),
    }
    res = {name: compute_metrics(extractor.outputs(x, False)[0], real, ("fid", "kid", "pr"), kid_subsets=10)
           for name, x in cases.items()}
    for name, r in res.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()))
    floor, removed, blurred, noise = res.values()
    for key in ("fid", "kid_mean"):
        assert floor[key] < removed[key] < blurred[key] < noise[key], key
    assert removed["fid"] > 3 * floor["fid"]
    assert removed["kid_mean"] > floor["kid_mean"] + 5 * max(floor["kid_std"], removed["kid_std"])
    # a missing class costs recall, not precision (~1/10 of the real manifold is uncovered)
    assert removed["precision"] > floor["precision"] - 0.05
    assert 0.04 < floor["recall"] - removed["recall"] < 0.2
    # blur and noise leave the real manifold: precision collapses
    assert blurred["precision"] < floor["precision"] - 0.15 and noise["precision"] < 0.1


def test_classifier_is_deterministic_and_cached(digits, tmp_path):
    images, labels = digits
    settings = ClassifierSettings(epochs=2)
    net_a, acc_a = train_classifier(images, labels, settings)
    net_b, acc_b = train_classifier(images, labels, settings)
    assert acc_a == acc_b
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    first = get_classifier(images, labels, settings, tmp_path)
    second = get_classifier(images, labels, settings, tmp_path)            # loaded from the file
    assert len(list(tmp_path.glob("lenet-*.pt"))) == 1
    assert second.test_accuracy == first.test_accuracy == acc_a and second.key == first.key
    for pa, pb in zip(first.net.parameters(), second.net.parameters(), strict=True):
        assert torch.equal(pa, pb)
    other = get_classifier(images, labels, ClassifierSettings(epochs=2, seed=1), tmp_path)
    assert other.key != first.key and len(list(tmp_path.glob("lenet-*.pt"))) == 2


def test_digits_features_reject_other_geometries(extractor):
    with pytest.raises(ValueError, match=r"^images: this classifier takes \(8, 8, 1\) images"):
        extractor.outputs(np.zeros((3, 16, 16, 1), np.uint8), False)
    with pytest.raises(ValueError, match=r"^images: expected uint8 images in \[0, 255\]"):
        extractor.outputs(np.zeros((3, 8, 8, 1), np.float32), False)
    with pytest.raises(ValueError, match=r"^ref: unknown data set"):
        load_reference_dataset("cifar100")


def test_cli_digits_features_report_accuracy_and_floor(digits, extractor, tmp_path):
    from atdiff.eval.samples_io import save_samples
    from benchmarks import evaluate

    images, labels = digits
    noise = np.random.default_rng(2).integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    save_samples(tmp_path / "noise.npz", noise)
    cache = str(extractor.info["cache_dir"])
    result = evaluate.main(["--samples", str(tmp_path / "noise.npz"), "--ref", "digits", "--features", "digits",
                            "--metrics", "fid,is,pr", "--cache-dir", cache, "--json", str(tmp_path / "r.json")])
    assert result["classifier_test_accuracy"] == extractor.info["classifier_test_accuracy"]  # the cached network
    assert result["floor_subset_size"] == 400 and result["n_ref"] == len(images)
    assert result["metrics"]["fid"] > 20 * result["floor"]["fid"]
    assert result["metrics"]["is_mean"] < result["floor"]["is_mean"]  # real digits are confidently classified
    assert result["floor"]["is_mean"] > 8
    assert result["metrics"]["precision"] < 0.1 < 0.8 < result["floor"]["precision"]
