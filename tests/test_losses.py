"""Losses against hand-computed values; the gradient loss never mixes batch items."""

import math

import pytest
import torch

from tasks import losses as L


def test_sig_loss_constant_scale_and_valid_mask():
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
    pred = 2.0 * gt + torch.tensor([[[0.0, 0.0], [0.0, 7.0]]])  # the invalid pixel is off
    loss = L.sig_loss(pred, gt, gt > 0, eps=0.0)
    assert float(loss) == pytest.approx(math.log(2.0) * math.sqrt(1 - 0.85))
    # g = (0, log 2): mean g^2 = log^2 2 / 2, mean g = log 2 / 2
    g = math.log(2.0)
    loss = L.sig_loss(torch.tensor([[1.0, 4.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[True, True]]), eps=0)
    assert float(loss) == pytest.approx(math.sqrt(g * g / 2 - 0.85 * (g / 2) ** 2))
    assert float(L.sig_loss(gt, gt, gt > 0)) == pytest.approx(0.0, abs=1e-6)


def _from_log_diff(D):
    gt = torch.full_like(D, 2.0)
    return gt * torch.exp(D), gt


def test_gradient_loss_hand_example_and_per_image():
    D = torch.zeros(2, 3, 3)
    D[1, 0, 0] = 1.0  # image 0 perfect; image 1 one outlier in the corner
    pred, gt = _from_log_diff(D)
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    # image 1: one vertical pair (row 0 vs row 2, col 0) and one horizontal pair, each |1 - 0| = 1; 9 valid
    single = [float(L.gradient_loss(pred[i : i + 1], gt[i : i + 1], valid[i : i + 1], eps=0)) for i in range(2)]
    assert single == pytest.approx([0.0, 2 / 9])
    assert float(L.gradient_loss(pred, gt, valid, eps=0)) == pytest.approx(1 / 9)


def test_gradient_loss_does_not_mix_batch_items():
    # two different images, each predicted up to a constant log-offset: zero gradient error per image.
    D = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])
    pred, gt = _from_log_diff(D)
    gt = gt * torch.stack([torch.ones(8, 8), torch.full((8, 8), 3.0)])
    pred = gt * torch.exp(D)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    # differencing across the batch axis (the original bug) would see |0 - 1| everywhere
    assert float(L.gradient_loss(pred, gt, valid, scales=(1, 2, 4, 6), eps=0)) == pytest.approx(0.0, abs=1e-6)
    # and a batch equals the mean of its images
    pred2 = pred.clone()
    pred2[0, 0, 0] *= math.e
    full = float(L.gradient_loss(pred2, gt, valid, scales=(1, 2, 4, 6), eps=0))
    parts = [
        float(L.gradient_loss(pred2[i : i + 1], gt[i : i + 1], valid[i : i + 1], scales=(1, 2, 4, 6), eps=0))
        for i in range(2)
    ]
    assert full == pytest.approx(sum(parts) / 2) and parts[1] == pytest.approx(0.0, abs=1e-6)


def test_multiscale_gradient_loss_hand_example_and_invalid_pairs():
    D = torch.zeros(1, 5, 5)
    D[0, 0, 0] = 1.0
    pred, gt = _from_log_diff(D)
    valid = torch.ones(1, 5, 5, dtype=torch.bool)
    # scale 1: 2 pairs / 25 valid; scale 2 (3x3): 2 / 9; scales 4 (2x2) and 6 (1x1): no pairs 2 apart
    assert float(L.gradient_loss(pred, gt, valid, scales=(1, 2, 4, 6), eps=0)) == pytest.approx(2 / 25 + 2 / 9)
    # a pair whose partner pixel is invalid does not count (the count still includes valid pixels only)
    valid[0, 2, 0] = False
    assert float(L.gradient_loss(pred, gt, valid, scales=(1,), eps=0)) == pytest.approx(1 / 24)


def test_depth_loss_weights():
    D = torch.zeros(1, 3, 3)
    D[0, 0, 0] = 1.0
    pred, gt = _from_log_diff(D)
    valid = gt > 0
    want = 10 * float(L.sig_loss(pred, gt, valid)) + 0.5 * float(L.gradient_loss(pred, gt, valid, (1, 2, 4, 6)))
    got = float(L.depth_loss(pred, gt, valid, 10.0, 0.5, (1, 2, 4, 6), "image"))
    assert got == pytest.approx(want)


def test_angular_nll_hand_value():
    gt = torch.zeros(1, 3, 1, 2)
    gt[:, 2] = 1.0
    a = math.radians(30)
    pred = torch.tensor([0.0, math.sin(a), math.cos(a)]).view(1, 3, 1, 1).expand(1, 3, 1, 2) * 2
    kappa = L.kappa_from_raw(torch.zeros(1, 1, 2))
    assert float(kappa[0, 0, 0]) == pytest.approx(1.01)
    valid = torch.tensor([[[True, False]]])
    k = 1.01
    want = math.log(1 + math.exp(-k * math.pi)) - math.log(1 + k * k) + k * a
    assert float(L.angular_nll_loss(pred, kappa, gt, valid)) == pytest.approx(want, rel=1e-5)
    # kappa -> larger means more confident: lower loss for a perfect prediction
    k_hi = L.kappa_from_raw(torch.full((1, 1, 2), 5.0))
    assert float(L.angular_nll_loss(gt, k_hi, gt, valid)) < float(L.angular_nll_loss(gt, kappa, gt, valid))
    assert float(L.angular_loss(pred, gt, valid)) == pytest.approx(a, rel=1e-5)


def test_cross_entropy_ignores_255():
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[1, 0, 255]]])
    total = -math.log(3 / 4) - math.log(1 / 4)
    # mmseg CrossEntropyLoss(avg_non_ignore=False), the FiT3D/SnD linear seg default: / all 3 pixels
    assert float(L.seg_loss(logits, target)) == pytest.approx(total / 3)
    assert float(L.seg_loss(logits, target, avg_non_ignore=True)) == pytest.approx(total / 2)
    assert float(L.seg_loss(logits, torch.full((1, 1, 3), 255))) == 0.0


def test_published_mmseg_gradient_loss_is_zero_at_two_images_per_gpu():
    # FiT3D/SnD evaluation/depth/models/losses/gradientloss.py on [B,1,H,W]: its slices hit batch/channel axes
    torch.manual_seed(0)
    gt = torch.rand(2, 1, 6, 8) * 5 + 0.5
    pred = torch.rand(2, 1, 6, 8) * 5 + 0.5  # far from gt, with strong spatial gradient errors
    assert float(L.mmseg_gradient_loss(pred, gt)) == 0.0
    assert float(L.gradient_loss(pred[:, 0], gt[:, 0], gt[:, 0] > 0)) > 0.1  # the spatial loss is not
    # at 3 images it differences image 0 against image 2 (batch axis): non-zero, mixing images
    g3 = torch.full((3, 1, 2, 2), 2.0)
    p3 = g3.clone()
    p3[2] *= math.e
    # d = (0, 0, 1) over the batch; v: |d0 - d2| = 1 on 4 pixels, divided by 12 valid; h: empty (1 channel)
    assert float(L.mmseg_gradient_loss(p3, g3, eps=0.0)) == pytest.approx(4 / 12 + 0 + 0 + 0, abs=1e-6)


def test_sigloss_unbiased_variance_and_100_iteration_warm_up():
    # g = log(pred) - log(gt) = (0, log 2): mean g = log2/2, unbiased var = (log2)^2 / 2
    gt, pred, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 4.0]]), torch.tensor([[True, True]])
    g = math.log(2.0)
    assert float(L.sig_loss(pred, gt, v, eps=0, variance="unbiased")) == pytest.approx(
        math.sqrt(g * g / 2 + 0.15 * g * g / 4)
    )
    sig = L.SigLoss(warm_up=True, warm_iter=100, variance="unbiased", eps=0.0)
    warm = [float(sig(pred, gt, v)) for _ in range(100)]
    assert warm == pytest.approx([math.sqrt(0.15) * g / 2] * 100)  # sqrt(0.15 mean(g)^2)
    assert float(sig(pred, gt, v)) == pytest.approx(math.sqrt(g * g / 2 + 0.15 * g * g / 4))  # iteration 101


def test_probe3d_gradient_loss_pools_the_batch():
    # Probe3D evals/utils/losses.py: sums and valid counts over the whole batch at each scale
    D = torch.zeros(2, 3, 3)
    D[1, 0, 0] = 1.0
    pred, gt = _from_log_diff(D)
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[0, 2, 2] = False  # image 0 has 8 valid pixels, image 1 has 9
    # image 1: 2 pairs with |1 - 0|; pooled: 2 / (8 + 9); per image: (0 + 2/9) / 2
    assert float(L.gradient_loss(pred, gt, valid, (1,), eps=0, reduction="batch")) == pytest.approx(2 / 17)
    assert float(L.gradient_loss(pred, gt, valid, (1,), eps=0, reduction="image")) == pytest.approx(1 / 9)


def test_sigloss_iteration_counts_one_warm_up_step_for_all_its_groups():
    """One step's loss computed per 2-image group (the anchor's GPUs): each group's SigLoss over its own
    pixels, all in the same warm-up state, and the counter advances once per step (also with no call)."""
    g1 = torch.tensor([0.1, 0.3])  # log-ratios of group 1 (2 valid pixels), group 2 (3 pixels)
    g2 = torch.tensor([-0.2, 0.0, 0.5])
    gt = torch.ones(5)
    pred = torch.exp(torch.cat([g1, g2])) * (gt + L.EPS) - L.EPS
    valid = torch.ones(5, dtype=torch.bool)
    sig = L.SigLoss(warm_up=True, warm_iter=1, variance="unbiased")
    with sig.iteration():  # warm-up: sqrt(0.15 mean(g)^2) per group
        a, b = sig(pred[:2], gt[:2], valid[:2]), sig(pred[2:], gt[2:], valid[2:])
    assert sig.counter == 1
    assert float(a) == pytest.approx(math.sqrt(0.15) * 0.2, rel=1e-5)
    assert float(b) == pytest.approx(math.sqrt(0.15) * 0.1, rel=1e-5)
    with sig.iteration():  # after warm-up: sqrt(var_unbiased(g) + 0.15 mean(g)^2) per group
        a, b = sig(pred[:2], gt[:2], valid[:2]), sig(pred[2:], gt[2:], valid[2:])
    assert sig.counter == 1
    assert float(a) == pytest.approx(math.sqrt(0.02 + 0.15 * 0.04), rel=1e-5)
    assert float(b) == pytest.approx(math.sqrt(0.13 + 0.15 * 0.01), rel=1e-5)
    pooled = L.sig_loss(pred, gt, valid, variance="unbiased")  # one SigLoss over the 5 pooled pixels differs
    assert abs(float(pooled) - 0.5 * float(a + b)) > 1e-2
    idle = L.SigLoss(warm_up=True, warm_iter=3)
    with idle.iteration():  # a rank without items in this step still counts it
        pass
    assert idle.counter == 1


# -- issue 26 item 1: the gradient loss of each Probe3D code version -------------------------------------------------
def test_probe3d_1fff822_gradient_loss_compares_images_two_apart_at_batch_8():
    # Probe3D 1fff822 evals/utils/losses.py::gradient_loss on [B,1,H,W]: depth[::2i, ::2i] and d[0:-2, :] - d[2:, :]
    # slice the batch and channel axes. With 1 channel the horizontal term is empty and the vertical one is
    # |d[b] - d[b+2]| per pixel, over the scales x, x[::2], x[::4], x[::6] of the batch axis.
    B, H, W = 8, 3, 4
    gt = torch.full((B, H, W), 2.0)
    pred = gt.clone()
    pred[3] *= math.e  # log-difference d = 1 on image 3 only
    valid = gt > 0
    # scale 1 (8 images, 96 valid): pairs (1,3), (3,5) differ -> 2 x 12 pixels; scale 2 (images 0,2,4,6): no
    # image 3; scale 4 (0, 4): none; scale 6 (0, 6): none
    want = 0.5 * (2 * 12 / (8 * 12))
    got = L.depth_loss(pred, gt, valid, 0.0, 0.5, (1, 2, 4, 6), "batch", grad_slices="leading")
    assert float(got) == pytest.approx(want, rel=1e-3)  # eps = 1e-3 inside the logs
    # the same batch under the image-axes loss (ac00369 / SnD evaluation2): image 3 is constant in d, so no
    # spatial gradient anywhere
    img = L.depth_loss(pred, gt, valid, 0.0, 0.5, (1, 2, 4, 6), "batch", grad_slices="image")
    assert float(img) == pytest.approx(0.0, abs=1e-7)


def test_probe3d_1fff822_gradient_loss_is_zero_at_batch_2():
    torch.manual_seed(1)
    gt = torch.rand(2, 6, 8) + 0.5
    pred = torch.rand(2, 6, 8) + 0.5
    got = L.depth_loss(pred, gt, gt > 0, 0.0, 0.5, (1, 2, 4, 6), "batch", grad_slices="leading")
    assert float(got) == 0.0


def test_evaluation2_gradient_loss_on_the_image_axes():
    # SnD evaluation2/evals/utils/losses.py (= Probe3D ac00369): depth[..., ::2i, ::2i], d[..., 0:-2, :] - d[..., 2:, :]
    # and sums / valid counts pooled over the batch. One image, d = 1 at pixel (0, 0) of a 5x5 map:
    # scale 1: 2 pairs / 25; x[::2, ::2] (3x3): 2 / 9; x[::4, ::4] (2x2) and x[::6, ::6] (1x1): no pairs 2 apart.
    D = torch.zeros(2, 5, 5)
    D[0, 0, 0] = 1.0
    pred, gt = _from_log_diff(D)
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    got = L.depth_loss(pred, gt, valid, 0.0, 1.0, (1, 2, 4, 6), "batch", grad_slices="image")
    assert float(got) == pytest.approx(2 / 50 + 2 / 18, rel=1e-3)  # eps = 1e-3 inside the logs
    # the batch-axis slices see two images that differ only at (0, 0): 2 images < 3, so no pair 2 apart
    lead = L.depth_loss(pred, gt, valid, 0.0, 1.0, (1, 2, 4, 6), "batch", grad_slices="leading")
    assert float(lead) == 0.0
