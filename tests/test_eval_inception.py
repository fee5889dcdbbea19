"""The FID path end to end on a stand-in TorchScript extractor with the contract of StyleGAN2-ADA's
inception-2015-12-05.pt (uint8 / [0, 255] NCHW in at any size, 2048 features with return_features=True,
class probabilities otherwise), and the errors for missing weights and bad images."""

import json

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from atdiff.eval.frechet import fit_gaussian, frechet_distance
from atdiff.eval.inception import INCEPTION_URL, load_inception, network_outputs
from atdiff.eval.inception_score import inception_score
from atdiff.eval.kid import kernel_inception_distance
from atdiff.eval.precision_recall import precision_recall
from atdiff.eval.samples_io import save_samples
from benchmarks import evaluate

# the real network exists only as TorchScript; the stand-ins are scripted the same way
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*deprecated:DeprecationWarning")


class StandIn(nn.Module):
    """Resizes to 8x8 itself, 2048 random Fourier features cos(x W + b) (well-conditioned covariance, like real
    Inception pool features over many images), a 1008-way softmax head."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * 64, 2048, generator=g) * 0.5, requires_grad=False)
        self.phase = nn.Parameter(torch.rand(2048, generator=g) * 6.283, requires_grad=False)
        self.head = nn.Parameter(torch.randn(2048, 1008, generator=g) / 10, requires_grad=False)

    def forward(self, img: Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> Tensor:
        x = nn.functional.interpolate(img.to(torch.float32) / 255, size=(8, 8), mode="bilinear", align_corners=False)
        f = torch.cos(x.flatten(1) @ self.proj + self.phase)
        if return_features:
            return f
        return torch.softmax(f @ self.head, dim=1)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "inception-2015-12-05.pt"
    torch.jit.script(StandIn()).save(str(path))
    return path


def _images(seed, n, size=16, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, size, size, 3)) + shift
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.slow  # four 2048-d Frechet distances: ~20 s on an idle 2-core CPU, a minute under load
def test_cli_fid_equals_frechet_distance_on_the_extractor_features(standin, tmp_path):
    # more rows than the 2048 feature dimensions (full-rank covariances, as in real FID use), and a reference
    # twice as large so that the floor's halves are full rank too
    samples, ref = _images(0, 2100, shift=40), _images(1, 4300)
    save_samples(tmp_path / "samples.npz", samples)
    save_samples(tmp_path / "ref.npz", ref)
    out, cache = tmp_path / "r.json", str(tmp_path / "cache")
    common = ["--samples", str(tmp_path / "samples.npz"), "--inception", str(standin), "--cache-dir", cache,
              "--kid-subsets", "10", "--kid-subset-size", "100", "--no-progress"]
    result = evaluate.main(common + ["--ref", str(tmp_path / "ref.npz"), "--metrics", "fid,kid,is",
                                     "--batch-size", "700", "--json", str(out)])
    net = load_inception(standin)
    with torch.no_grad():
        fs = net(torch.from_numpy(samples).permute(0, 3, 1, 2), return_features=True).double().numpy()
        fr = net(torch.from_numpy(ref).permute(0, 3, 1, 2), return_features=True).double().numpy()
        ps = net(torch.from_numpy(samples).permute(0, 3, 1, 2), no_output_bias=True).double().numpy()
    assert fs.shape == (2100, 2048)
    ref_stats = fit_gaussian(fr)
    direct = frechet_distance(fit_gaussian(fs), ref_stats)
    print(f"FID on the stand-in: CLI {result['metrics']['fid']:.6f}, direct {direct:.6f}, floor "
          f"{result['floor']['fid']:.4f}")
    assert direct > 1.0
    assert result["metrics"]["fid"] == pytest.approx(direct, rel=1e-6)
    assert result["metrics"]["kid_mean"] == pytest.approx(kernel_inception_distance(fs, fr, 10, 100)[0], rel=1e-6)
    assert result["metrics"]["is_mean"] == pytest.approx(inception_score(ps)[0], rel=1e-6)
    saved = json.loads(out.read_text())
    assert saved["metrics"] == result["metrics"] and saved["command"].startswith("python -m benchmarks.evaluate")
    # floor: two disjoint random halves of the reference, as large as the sample set
    assert saved["floor_subset_size"] == 2100 and saved["floor"]["fid"] < 0.5 * direct
    # published statistics (ADM's mu/sigma convention) as the reference: FID against them, no floor
    ref_stats.save(tmp_path / "ref_stats.npz")
    from_stats = evaluate.main(common + ["--ref", str(tmp_path / "ref_stats.npz"), "--metrics", "fid"])
    assert from_stats["metrics"]["fid"] == pytest.approx(direct, rel=1e-6)


class PlainExtractor(nn.Module):
    """Any TorchScript module forward(images) -> (N, d) features is accepted (features only, no IS)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.proj = nn.Parameter(torch.randn(3 * 16, 32, generator=g), requires_grad=False)

    def forward(self, img: Tensor) -> Tensor:
        x = nn.functional.interpolate(img.to(torch.float32) / 255, size=(4, 4), mode="bilinear", align_corners=False)
        return torch.cos(x.flatten(1) @ self.proj)


def test_cli_path_cache_and_statistics_on_a_plain_extractor(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.script(PlainExtractor()).save(str(path))
    samples, ref = _images(5, 300, shift=30), _images(6, 700)
    save_samples(tmp_path / "s.npz", samples)
    save_samples(tmp_path / "r.npz", ref)
    cache = str(tmp_path / "cache")
    common = ["--samples", str(tmp_path / "s.npz"), "--inception", str(path), "--cache-dir", cache,
              "--kid-subsets", "10", "--kid-subset-size", "100", "--no-progress"]
    result = evaluate.main(common + ["--ref", str(tmp_path / "r.npz"), "--metrics", "fid,kid,pr", "--batch-size",
                                     "64"])
    net = load_inception(path)
    with torch.no_grad():
        fs = net(torch.from_numpy(samples).permute(0, 3, 1, 2)).double().numpy()
        fr = net(torch.from_numpy(ref).permute(0, 3, 1, 2)).double().numpy()
    direct = frechet_distance(fit_gaussian(fs), fit_gaussian(fr))
    assert direct > 1.0 and result["floor"]["fid"] < 0.5 * direct
    assert result["metrics"]["fid"] == pytest.approx(direct, rel=1e-6)
    assert result["metrics"]["kid_mean"] == pytest.approx(kernel_inception_distance(fs, fr, 10, 100)[0], rel=1e-6)
    assert (result["metrics"]["precision"], result["metrics"]["recall"]) == pytest.approx(
        precision_recall(fr, fs), abs=1e-12)
    assert result["floor_subset_size"] == 300
    # a second run reads the cached reference features
    again = evaluate.main(common + ["--ref", str(tmp_path / "r.npz"), "--metrics", "fid"])
    assert again["metrics"]["fid"] == result["metrics"]["fid"]
    assert len(list((tmp_path / "cache").glob("features-*.npz"))) == 1
    # published statistics (ADM's mu/sigma convention) as the reference: FID against them, no floor
    stats = fit_gaussian(fr)
    stats.save(tmp_path / "ref_stats.npz")
    from_stats = evaluate.main(common + ["--ref", str(tmp_path / "ref_stats.npz"), "--metrics", "fid"])
    assert from_stats["metrics"]["fid"] == pytest.approx(direct, rel=1e-6)
    assert from_stats["floor"] is None and from_stats["fid_reference"] == "published mu/sigma"
    with pytest.raises(ValueError, match=r"^ref: metrics \['kid'\] need reference features"):
        evaluate.main(common + ["--ref", str(tmp_path / "ref_stats.npz"), "--metrics", "fid,kid"])
    with pytest.raises(ValueError, match=r"^metrics: the Inception Score needs class probabilities"):
        evaluate.main(common + ["--ref", str(tmp_path / "r.npz"), "--metrics", "is"])


def test_float_pixel_input_matches_uint8(standin):
    net = load_inception(standin)
    x = torch.from_numpy(_images(4, 20)).permute(0, 3, 1, 2)
    f_u8, _ = network_outputs(net, x, batch_size=3)
    f_float, _ = network_outputs(net, x.float())
    np.testing.assert_allclose(f_u8, f_float, rtol=1e-6)


def test_missing_weights_file_names_the_flag_and_the_url(tmp_path, monkeypatch):
    monkeypatch.delenv("ATDIFF_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError, match=r"^path: .*never downloads") as err:
        load_inception(tmp_path / "nowhere.pt")
    assert INCEPTION_URL in str(err.value) and "--inception" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"no path was given"):
        load_inception(None)
    save_samples(tmp_path / "s.npz", _images(0, 4))
    with pytest.raises(FileNotFoundError, match=r"--inception PATH"):
        evaluate.main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--no-progress"])
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match=r"^path: .*not a loadable TorchScript"):
        load_inception(tmp_path / "junk.pt")
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match=r"^backend: 'torch-fidelity' needs"):
            load_inception(tmp_path / "junk.pt", backend="torch-fidelity")


def test_bad_images_are_rejected(standin, tmp_path):
    net = load_inception(standin)
    good = torch.from_numpy(_images(0, 4)).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"^images: float images must lie in \[0, 255\].*to_uint8"):
        network_outputs(net, good.float() / 127.5 - 1)
    with pytest.raises(ValueError, match=r"^images: float images in \[0, 1\]"):
        network_outputs(net, good.float() / 255)
    with pytest.raises(ValueError, match=r"^images: expected \(N, C, H, W\) images with C in \(1, 3\)"):
        network_outputs(net, good[:, :2])
    grey = good[:, :1]
    f_grey, _ = network_outputs(net, grey)
    f_rgb, _ = network_outputs(net, grey.expand(-1, 3, -1, -1))
    np.testing.assert_array_equal(f_grey, f_rgb)
    # resolution mismatch between samples and reference images
    save_samples(tmp_path / "s.npz", _images(0, 8, size=16))
    save_samples(tmp_path / "r.npz", _images(1, 8, size=32))
    with pytest.raises(ValueError, match=r"^samples: images are \(16, 16, 3\).*reference images are \(32, 32, 3\)"):
        evaluate.main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"),
                       "--inception", str(standin), "--no-progress"])
    with pytest.raises(ValueError, match=r"^metrics: "):
        evaluate.main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                       "--metrics", "fid,foo", "--inception", str(standin), "--no-progress"])
