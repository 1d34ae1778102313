"""Sample quality on the built-in digits: Frechet distance in the feature space of a small classifier.

The classifier (an MLP on 8x8 digits) is trained on a fixed train split of sklearn's digits; its
penultimate activations are the features. Reported beside each score is the *floor*: the same distance
between the real test split and the real train split, i.e. what a perfect generator of that many images
would score. ``ratio = fd / floor`` (1 is as good as real data; the digits default aims at <= 2). For a
conditional model, ``class_agreement`` is how often the classifier names the requested class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsQuality", "frechet_distance"]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets float[N, D] and float[M, D] (float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr(sqrt(A B)) = Tr(sqrt(sqrt(A) B sqrt(A))), a symmetric PSD matrix: stable through eigh
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _to_8x8(images: np.ndarray) -> torch.Tensor:
    """float images [N, H, W] or [N, 1, H, W] or [N, H, W, 1] in [0, 1] -> float32[N, 64] at 8x8."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x[:, 0] if x.shape[1] == 1 else x[..., 0]
    t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
    if t.shape[-1] != 8:
        t = F.adaptive_avg_pool2d(t, 8)
    return t.reshape(len(t), 64)


@dataclass
class DigitsQuality:
    """Train the feature classifier once; score any number of sample sets against it."""

    seed: int = 0
    test_fraction: float = 0.3

    def __post_init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.astype(np.float32) / 16.0
        y = d.target.astype(np.int64)
        perm = np.random.default_rng(self.seed).permutation(len(x))
        n_test = int(round(len(x) * self.test_fraction))
        test, train = perm[:n_test], perm[n_test:]
        self.x_train, self.y_train = _to_8x8(x[train]), torch.from_numpy(y[train])
        self.x_test, self.y_test = _to_8x8(x[test]), torch.from_numpy(y[test])
        g = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net = _Classifier()
        opt = torch.optim.Adam(self.net.parameters(), lr=3e-3, weight_decay=1e-4)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
        try:
            for _ in range(400):  # minibatches of 256 from 1.2k images: about a second
                idx = torch.randperm(len(self.x_train), generator=g)[:256]
                loss = F.cross_entropy(self.net(self.x_train[idx]), self.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
        self.net.eval()
        with torch.no_grad():
            self.test_accuracy = float((self.net(self.x_test).argmax(1) == self.y_test).float().mean())
        self.train_features = self.features(self.x_train)
        self.floor = frechet_distance(self.features(self.x_test), self.train_features)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.net.body(x).numpy()

    @torch.no_grad()
    def score(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        """``images``: generated digits in [0, 1] ([N, H, W], [N, 1, H, W] or [N, H, W, 1]); ``labels``: the
        requested classes of a conditional model."""
        x = _to_8x8(images)
        fd = frechet_distance(self.features(x), self.train_features)
        out = {
            "fd": fd,
            "floor": self.floor,
            "ratio": fd / self.floor,
            "num_images": len(x),
            "classifier_test_accuracy": self.test_accuracy,
        }
        if labels is not None:
            pred = self.net(x).argmax(1).numpy()
            out["class_agreement"] = float((pred == np.asarray(labels)).mean())
        return out
