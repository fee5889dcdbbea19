"""Image-sample evaluation: FID, KID, Inception Score and improved precision/recall on Inception features loaded
from a local file, an offline classifier-feature metric for CPU studies (digits, MNIST-5k) with its real-vs-real
floor, sample files in ADM's ``.npz`` format, a sharding plan that gives the same samples on any number of
processes, and the paper's sampler-by-NFE table layout.

``python -m benchmarks.evaluate --help`` runs it all from the command line.
"""

from atdiff.eval.classifier import ClassifierSettings, LeNet, get_classifier, train_classifier
from atdiff.eval.features import (
    FEATURE_KINDS,
    METRICS,
    Extractor,
    cached_features,
    classifier_extractor,
    compute_metrics,
    inception_extractor,
    load_reference_dataset,
    make_extractor,
    metric_floor,
)
from atdiff.eval.frechet import GaussianStats, fit_gaussian, frechet_distance, sqrtm_psd
from atdiff.eval.inception import INCEPTION_URL, load_inception, network_outputs
from atdiff.eval.inception_score import inception_score, softmax
from atdiff.eval.kid import kernel_inception_distance, mmd2_unbiased
from atdiff.eval.precision_recall import precision_recall
from atdiff.eval.samples_io import load_samples, save_grid, save_samples, to_uint8
from atdiff.eval.sharding import Batch, batch_generator, batch_plan, merge_shards
from atdiff.eval.sweep_table import nfe_table_markdown, plot_metric_vs_nfe

__all__ = [
    "ClassifierSettings", "LeNet", "get_classifier", "train_classifier",
    "FEATURE_KINDS", "METRICS", "Extractor", "cached_features", "classifier_extractor", "compute_metrics",
    "inception_extractor", "load_reference_dataset", "make_extractor", "metric_floor",
    "GaussianStats", "fit_gaussian", "frechet_distance", "sqrtm_psd",
    "INCEPTION_URL", "load_inception", "network_outputs",
    "inception_score", "softmax", "kernel_inception_distance", "mmd2_unbiased", "precision_recall",
    "load_samples", "save_grid", "save_samples", "to_uint8",
    "Batch", "batch_generator", "batch_plan", "merge_shards", "nfe_table_markdown", "plot_metric_vs_nfe",
]
