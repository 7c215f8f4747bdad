"""Every evaluation metric on constructed inputs with known answers, and every bad input's message."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffkit.evaluation import (
    concept_accuracy,
    cross_domain_retain_accuracy,
    fid,
    frechet_distance,
    gaussian_stats,
    hsv_saturation,
    image_saturation,
    in_domain_retain_accuracy,
    kid,
    mean_psnr,
    mean_saturation,
    mmd2_unbiased,
    polynomial_kernel,
    psnr,
    to_float_images,
    to_uint8_images,
    unlearning_accuracy,
)

# ---------------------------------------------------------------- image conversion


def _img(rgb, size=4):
    return np.full((size, size, 3), rgb, np.uint8)


def test_to_float_images_accepts_every_documented_form():
    a = np.stack([_img((255, 0, 0)), _img((0, 51, 255))])  # (2, 4, 4, 3) uint8
    want = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 1.0]])[:, :, None, None].expand(2, 3, 4, 4)
    forms = [
        a,
        torch.from_numpy(a),
        torch.from_numpy(a).permute(0, 3, 1, 2),
        [a[0], a[1]],
        [Image.fromarray(a[0]), Image.fromarray(a[1])],
    ]
    for form in forms:
        got = to_float_images(form)
        assert got.shape == (2, 3, 4, 4) and got.dtype == torch.float32
        torch.testing.assert_close(got, want)
    f01 = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(to_float_images(f01, value_range=(0, 1)), want)
    torch.testing.assert_close(to_float_images(f01 * 2 - 1, value_range=(-1, 1)), want)
    torch.testing.assert_close(to_float_images(f01.permute(0, 2, 3, 1).numpy(), value_range=(0, 1)), want)
    assert to_float_images(Image.fromarray(a[0])).shape == (1, 3, 4, 4)  # one image -> batch of one
    # a decoder's small overshoot is clipped: -1.05 and 1.05 in (-1, 1) become 0 and 1
    over = torch.tensor([-1.05, 1.05]).reshape(1, 1, 1, 2).expand(1, 3, 1, 2)
    torch.testing.assert_close(to_float_images(over, value_range=(-1, 1)), torch.tensor([0.0, 1.0]).expand(1, 3, 1, 2))
    assert to_float_images(a[0]).shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(to_uint8_images(f01, value_range=(0, 1)), a)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.rand(2, 3, 4, 4), {}, "need an explicit value_range=(0, 1) or (-1, 1)"),
        (torch.rand(2, 3, 4, 4) * 255, {"value_range": (0, 1)}, "outside the stated value_range (0, 1)"),
        (torch.rand(2, 3, 4, 4), {"value_range": (0, 255)}, "value_range must be (0, 1) or (-1, 1), got (0, 255)"),
        (torch.full((1, 3, 4, 4), float("nan")), {"value_range": (0, 1)}, "NaN or infinite"),
        ([], {}, "images is empty"),
        (np.zeros((2, 4, 4, 4), np.uint8), {}, "3 color channels"),
        (np.zeros((4, 4), np.uint8), {}, "got shape (4, 4)"),
        ([Image.new("L", (4, 4))], {}, "PIL images must be RGB, got mode(s) L"),
        ([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 5))], {}, "same size"),
        ([Image.new("RGB", (4, 4)), np.zeros((4, 4, 3), np.uint8)], {}, "mixes PIL images with arrays"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)], {}, "same shape"),
        (np.zeros((1, 4, 4, 3), np.int64), {}, "uint8 (0..255) or floating point"),
        ("image.png", {}, "got str"),
    ],
)
def test_to_float_images_rejects_bad_input(images, kwargs, message):
    with pytest.raises(ValueError) as e:
        to_float_images(images, **kwargs)
    assert message in str(e.value)


# ---------------------------------------------------------------- accuracy, UA, IRA, CRA


def test_concept_accuracy_skips_unnamed_factors():
    pred = {"object": ["star", "circle", "star", "moon"], "color": ["red", "red", "blue", "red"]}
    expected = {"object": ["star", "star", "star", None], "color": [None, None, None, None]}
    assert concept_accuracy(pred, expected) == {"object": 2 / 3}  # color never named -> absent


def test_unlearning_in_domain_and_cross_domain_retain_accuracy():
    # erased concept: color red. Forget images: the oracle still sees red in 1 of 4 -> UA = 3/4.
    assert unlearning_accuracy(["red", "blue", "pink", "green"], "red") == 0.75
    # IRA over prompts of other colors: 2 of the 3 scored images correct; the 'red' and None rows are ignored.
    assert in_domain_retain_accuracy(["blue", "green", "red", "blue", "red"],
                                     ["blue", "green", "yellow", "red", None], "red") == pytest.approx(2 / 3)
    # CRA pools (image, factor) pairs of the other factors: object 2/3 named correct, style 1/2 -> 3/5.
    pred = {"color": ["red"] * 3, "object": ["star", "moon", "heart"], "style": ["solid", "dotted", "solid"]}
    expected = {"color": ["blue"] * 3, "object": ["star", "moon", "star"], "style": ["solid", None, "striped"]}
    assert cross_domain_retain_accuracy(pred, expected, "color") == pytest.approx(3 / 5)


def test_accuracy_bad_inputs():
    with pytest.raises(ValueError, match="at least one prediction"):
        unlearning_accuracy([], "red")
    with pytest.raises(ValueError, match="no image expects a concept other than 'red'"):
        in_domain_retain_accuracy(["red"], ["red"], "red")
    with pytest.raises(ValueError, match="2 predictions but 1 expected"):
        in_domain_retain_accuracy(["red", "blue"], ["blue"], "red")
    with pytest.raises(ValueError, match="no predictions for factor 'style'"):
        concept_accuracy({"object": ["star"]}, {"style": ["solid"]})
    with pytest.raises(ValueError, match="no expected label for any factor other than 'color'"):
        cross_domain_retain_accuracy({"color": ["red"], "object": ["star"]}, {"color": ["red"], "object": [None]},
                                     "color")


# ---------------------------------------------------------------- KID


def test_polynomial_kernel_is_cubic_of_scaled_dot_product():
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(polynomial_kernel(x, y), torch.tensor([[(1 / 2 + 1) ** 3, 1.0]]))


def test_mmd2_unbiased_by_hand():
    # d = 1, k(a, b) = (ab + 1)^3. X = {0, 1}, Y = {1, 2}:
    # XX off-diagonal k(0,1)=1 -> 1; YY off-diagonal k(1,2)=27 -> 27; XY mean (1+1+8+27)/4 = 9.25.
    assert mmd2_unbiased([[0.0], [1.0]], [[1.0], [2.0]]) == pytest.approx(1 + 27 - 2 * 9.25)


def test_kid_subset_average_matches_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)), rng.normal(loc=0.5, size=(9, 5))
    # subsets as large as the smaller set: b is always whole, a is subsampled -> mean over random 9-subsets
    mean, std = kid(a, b, subset_size=50, n_subsets=20, seed=3)
    gen = torch.Generator().manual_seed(3)
    vals = []
    for _ in range(20):
        ia = torch.randperm(12, generator=gen)[:9]
        ib = torch.randperm(9, generator=gen)[:9]
        vals.append(mmd2_unbiased(a[ia.numpy()], b[ib.numpy()]))
    assert mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals))
    # whole sets in every subset: all subsets equal the full estimate, std 0
    full = mmd2_unbiased(a[:9], b)
    m2, s2 = kid(a[:9], b, subset_size=9, n_subsets=3)
    assert m2 == pytest.approx(full) and s2 == pytest.approx(0.0, abs=1e-12)
    assert kid(a, b, subset_size=5, n_subsets=4, seed=1) == kid(a, b, subset_size=5, n_subsets=4, seed=1)


def test_kid_bad_inputs():
    with pytest.raises(ValueError, match="subset_size must be an integer >= 2, got 1"):
        kid(np.zeros((4, 2)), np.zeros((4, 2)), subset_size=1)
    with pytest.raises(ValueError, match="n_subsets must be an integer >= 1, got 0"):
        kid(np.zeros((4, 2)), np.zeros((4, 2)), n_subsets=0)
    with pytest.raises(ValueError, match="feature dimensions differ: 2 vs 3"):
        kid(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="2-D array"):
        kid(np.zeros(4), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd2_unbiased(np.zeros((1, 2)), np.zeros((4, 2)))


# ---------------------------------------------------------------- FID


def test_frechet_distance_closed_forms():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with variances 4 and 1 -> 9 + 1
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)
    # diagonal: |mu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 5 + 4 + 4
    assert frechet_distance([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([9.0, 16.0])) == pytest.approx(13.0)
    # general: Tr((S1 S2)^1/2) = sum of square roots of the eigenvalues of S1 S2
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(3), m2 @ m2.T + 0.1 * np.eye(3)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    assert frechet_distance(np.ones(3), s1, np.zeros(3), s2) == pytest.approx(3 + np.trace(s1 + s2) - 2 * tr)


def test_fid_on_features_uses_sample_mean_and_unbiased_covariance():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 4)), rng.normal(loc=1.0, size=(40, 4))
    mu, cov = gaussian_stats(a)
    np.testing.assert_allclose(mu, a.mean(0))
    np.testing.assert_allclose(cov, (a - a.mean(0)).T @ (a - a.mean(0)) / 49)
    mb, cb = gaussian_stats(b)
    assert fid(a, b) == pytest.approx(frechet_distance(mu, cov, mb, cb))
    assert fid(torch.from_numpy(a), a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="N >= 2"):
        fid(a[:1], b)
    with pytest.raises(ValueError, match="feature dimensions differ: 4 vs 3"):
        fid(a, b[:, :3])
    with pytest.raises(ValueError, match=r"sigma_b must have shape \(1, 1\)"):
        frechet_distance([0.0], [[1.0]], [0.0], np.eye(2))


# ---------------------------------------------------------------- saturation


def test_hsv_saturation_known_colors():
    colors = [(255, 0, 0), (128, 128, 128), (100, 150, 200), (0, 0, 0), (255, 255, 255)]
    want = [1.0, 0.0, (200 - 100) / 200, 0.0, 0.0]
    imgs = np.stack([_img(c, 2) for c in colors])
    sat = hsv_saturation(imgs)
    assert sat.shape == (5, 2, 2)
    torch.testing.assert_close(image_saturation(imgs), torch.tensor(want), atol=1e-6, rtol=0)
    assert mean_saturation(imgs) == pytest.approx(np.mean(want))
    # half red, half gray image -> 0.5; float input in [-1, 1] gives the same
    half = np.concatenate([_img((255, 0, 0), 2), _img((128, 128, 128), 2)], axis=1)
    assert mean_saturation(half) == pytest.approx(0.5)
    t = torch.from_numpy(half).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert mean_saturation(t, value_range=(-1, 1)) == pytest.approx(0.5)


# ---------------------------------------------------------------- PSNR


def test_psnr_known_values():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] += 0.5  # MSE 0.25 -> 10 log10(4) dB
    got = psnr(a, b, value_range=(0, 1))
    torch.testing.assert_close(got, torch.tensor([20.0, 10 * math.log10(4)], dtype=torch.float64))
    assert mean_psnr(a, b, value_range=(0, 1)) == pytest.approx((20 + 10 * math.log10(4)) / 2)
    u0, u1 = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)
    assert float(psnr(u0, u1)[0]) == pytest.approx(0.0)  # uint8 compared on the [0, 1] scale
    assert math.isinf(float(psnr(u0, u0)[0]))
    with pytest.raises(ValueError, match="image sets differ in shape"):
        psnr(u0, np.zeros((2, 4, 4, 3), np.uint8))
