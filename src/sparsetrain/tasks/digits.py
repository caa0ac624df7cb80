"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): no download needed."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from . import Task, register_task


def _digits_arrays():
    """scikit-learn's digits as ``(x, y)`` NumPy arrays, as ``load_digits(return_X_y=True)``
    gives them. Read from the CSV scikit-learn ships, found without importing scikit-learn:
    ``sklearn.datasets`` imports SciPy and much else, 0.8 s of every worker's start (a tenth
    of that here). Where that file is not where this scikit-learn keeps it, its loader runs."""
    import gzip
    import importlib.util
    import os

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        try:
            with gzip.open(path) as f:
                data = np.loadtxt(f, delimiter=",")
        except (OSError, ValueError):
            continue
        if data.shape == (1797, 65):
            return data[:, :-1], data[:, -1].astype(int)  # (as scikit-learn casts it)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def load_digits_tensors(seed: int = 0, test_fraction: float = 0.25, image: bool = False):
    """Return (train, test) TensorDatasets of digits, scaled to [0, 1], split fixed by ``seed``."""
    x, y = _digits_arrays()
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    if image:
        x = x.view(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 multilayer perceptron."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and a linear classifier for 1x8x8 images."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _positive(*names: str):
    """A task's check that its size options are at least 1."""

    def check(options: dict) -> None:
        for key in names:
            if key in options and options[key] < 1:
                raise ValueError(f"task option {key} must be at least 1, got {options[key]!r}")

    return check


@register_task("digits-mlp", check=_positive("hidden"))
def digits_mlp(seed: int = 0, hidden: int = 128) -> Task:
    train, test = load_digits_tensors(seed)
    return Task("digits-mlp", lambda: DigitsMLP(hidden), train, test, num_classes=10)


@register_task("digits-cnn", check=_positive("channels"))
def digits_cnn(seed: int = 0, channels: int = 16) -> Task:
    train, test = load_digits_tensors(seed, image=True)
    return Task("digits-cnn", lambda: DigitsCNN(channels), train, test, num_classes=10)


@register_task("digits-wide-mlp", check=_positive("hidden"))
def digits_wide_mlp(seed: int = 0, hidden: int = 2048) -> Task:
    """A communication-bound variant (about 4.3M parameters at hidden=2048) for benchmarks."""
    train, test = load_digits_tensors(seed)
    return Task("digits-wide-mlp", lambda: DigitsMLP(hidden), train, test, num_classes=10)
