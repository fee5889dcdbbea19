"""Evaluate image samples: FID, KID, Inception Score and improved precision/recall against a reference, with the
real-vs-real floor of every number beside it.

    python -m benchmarks.evaluate --samples samples.npz --ref REF [--metrics fid,kid,is,pr]
        [--features inception|digits|mnist5k] [--inception PATH] [--json OUT]

``--samples``: an ``.npz`` with uint8 NHWC images under ``arr_0`` (ADM's format; labels under ``arr_1`` are
ignored). ``--ref``: a data set (``digits``, ``mnist5k``, ``cifar10:ROOT``, ``cifar10-test:ROOT``,
``imagenet64:FILE.npz``) whose features are computed once and cached under a hash of the images and the network,
or an ``.npz`` reference batch (ADM's: ``arr_0`` images and/or ``mu``, ``sigma``; when ``mu``/``sigma`` are
present FID uses them, and KID, precision/recall and the floor use the images).

Features: ``inception`` is the standard FID Inception network read from a LOCAL file (never downloaded; see
``--inception``); ``digits`` / ``mnist5k`` are a small LeNet trained in seconds on that real data set (offline CPU
studies; its held-out test accuracy is printed). The floor is the same metric between two disjoint random subsets
of the reference, each as large as the sample set (at most half the reference).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from atdiff.eval.features import (
    FEATURE_KINDS,
    METRICS,
    cached_features,
    compute_metrics,
    load_reference_dataset,
    make_extractor,
    metric_floor,
)
from atdiff.eval.frechet import GaussianStats
from atdiff.eval.inception import INCEPTION_ENV, INCEPTION_URL
from atdiff.eval.samples_io import load_samples

LABELS = {"fid": "FID (Frechet distance)", "kid_mean": "KID mean", "kid_std": "KID std",
          "is_mean": "IS mean", "is_std": "IS std", "precision": "precision", "recall": "recall"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="sample .npz (uint8 NHWC images under arr_0)")
    p.add_argument("--ref", required=True,
                   help="reference: digits | mnist5k | cifar10:ROOT | cifar10-test:ROOT | imagenet64:FILE.npz | a "
                        ".npz with arr_0 images and/or mu, sigma (ADM reference batch)")
    p.add_argument("--metrics", default="fid,kid,pr",
                   help=f"comma-separated subset of {','.join(METRICS)} (default fid,kid,pr; 'is' needs a network "
                        "that returns class probabilities)")
    p.add_argument("--features", default="inception", choices=FEATURE_KINDS,
                   help="feature network: the FID Inception (local file) or a LeNet trained on digits / mnist5k")
    p.add_argument("--inception", default=None,
                   help=f"path of the FID Inception weights (default ${INCEPTION_ENV}); for the torchscript backend "
                        f"the file {INCEPTION_URL.rsplit('/', 1)[1]} from {INCEPTION_URL}, fetched by you once")
    p.add_argument("--backend", default="torchscript", choices=("torchscript", "torch-fidelity"),
                   help="how the Inception weights are run (torch-fidelity only if it imports)")
    p.add_argument("--device", default="cpu", help="torch device for the Inception network (e.g. cuda)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    p.add_argument("--cache-dir", default=None,
                   help="where reference features and trained classifiers are cached (default $ATDIFF_CACHE or "
                        "~/.cache/atdiff)")
    p.add_argument("--kid-subsets", type=int, default=100, help="number of KID subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="maximum rows per KID subset")
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    p.add_argument("--is-splits", type=int, default=10, help="splits for the Inception Score")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets and the floor's split")
    p.add_argument("--json", default=None, help="write the results (and the command) to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def load_reference(ref: str) -> tuple[np.ndarray | None, GaussianStats | None]:
    """Reference images (uint8 NHWC) and/or published statistics from ``--ref``."""
    if not ref.endswith(".npz"):
        return load_reference_dataset(ref)[0], None
    if not Path(ref).is_file():
        raise FileNotFoundError(f"ref: {ref} does not exist")
    with np.load(ref, allow_pickle=False) as f:
        keys = set(f.keys())
    stats = GaussianStats.load(ref) if {"mu", "sigma"} <= keys else None
    images = load_samples(ref)[0] if "arr_0" in keys else None
    if stats is None and images is None:
        raise ValueError(f"ref: {ref} has neither arr_0 images nor mu/sigma statistics (keys: {sorted(keys)})")
    return images, stats


def markdown(result: dict) -> str:
    """The metric table: value and real-vs-real floor per metric."""
    floor = result.get("floor") or {}
    lines = [f"| metric ({result['features']} features) | samples vs ref | real vs real (floor) |", "|---|---|---|"]
    for key, value in result["metrics"].items():
        fl = f"{floor[key]:.4g}" if key in floor else "n/a"
        lines.append(f"| {LABELS.get(key, key)} | {value:.4g} | {fl} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics: expected a comma-separated subset of {METRICS}, got {args.metrics!r}")
    samples, _ = load_samples(args.samples)
    ref_images, ref_stats = load_reference(args.ref)
    if ref_images is not None and ref_images.shape[1:] != samples.shape[1:]:
        raise ValueError(f"samples: images are {samples.shape[1:]} (H, W, C) but the reference images are "
                         f"{ref_images.shape[1:]}; evaluate at the reference's resolution and channels")
    extractor = make_extractor(args.features, args.inception, args.device, args.backend, args.cache_dir,
                               args.batch_size, progress=not args.no_progress)
    want_probs = "is" in metrics
    fake, fake_probs = extractor.outputs(samples, want_probs)
    real, real_probs = (cached_features(extractor, ref_images, want_probs, args.cache_dir)
                        if ref_images is not None else (None, None))
    options = dict(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, pr_k=args.pr_k,
                   is_splits=args.is_splits)
    values = compute_metrics(fake, real, metrics, fake_probs=fake_probs, real_stats=ref_stats, seed=args.seed,
                             **options)
    floor = (metric_floor(real, samples.shape[0], metrics, real_probs=real_probs, seed=args.seed, **options)
             if real is not None and real.shape[0] >= 4 else None)
    result = {
        "command": "python -m benchmarks.evaluate " + " ".join(shlex.quote(a) for a in
                                                               (sys.argv[1:] if argv is None else argv)),
        "samples": args.samples, "ref": args.ref, "features": extractor.name, **extractor.info,
        "n_samples": int(samples.shape[0]), "n_ref": int(real.shape[0]) if real is not None else ref_stats.n,
        "fid_reference": "published mu/sigma" if ref_stats is not None and "fid" in metrics else "ref features",
        "floor_subset_size": min(samples.shape[0], real.shape[0] // 2) if floor is not None else None,
        "metrics": values, "floor": floor,
    }
    print(markdown(result))
    if "classifier_test_accuracy" in extractor.info:
        print(f"\nclassifier held-out test accuracy: {extractor.info['classifier_test_accuracy']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
