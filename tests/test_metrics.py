"""Every metric against hand-computed values (see tasks/metrics.py and docs/PROTOCOLS.md)."""

import math

import pytest
import torch

from tasks import metrics as M


def _close(d, expected, tol=1e-6):
    for k, v in expected.items():
        got = d[k] if isinstance(d[k], float) else d[k].tolist()
        assert got == pytest.approx(v, abs=tol), (k, got, v)


def test_depth_constant_offset_hand_values():
    gt = torch.tensor([[[1.0, 2.0], [5.0, 10.0]]])
    pred = gt + 1  # ratios 2, 1.5, 1.2, 1.1
    m = M.depth_metrics(pred, gt)
    e = torch.log(pred / gt)
    _close(
        m,
        {
            "a1": [0.5],
            "a2": [0.75],
            "a3": [0.75],
            "rmse": [1.0],
            "abs_rel": [0.45],
            "sq_rel": [0.45],
            "rmse_log": [math.sqrt(float((e**2).mean()))],
            "log10": [float(torch.log10(pred / gt).mean())],
            "silog": [100 * math.sqrt(float((e**2).mean() - e.mean() ** 2))],
        },
    )
    # a constant multiplicative error has zero SILog and rmse_log = |log ratio|
    m = M.depth_metrics(torch.full((1, 2, 2), 2.4), torch.full((1, 2, 2), 2.0))
    _close(
        m,
        {
            "a1": [1.0],
            "rmse": [0.4],
            "abs_rel": [0.2],
            "sq_rel": [0.08],
            "rmse_log": [math.log(1.2)],
            "log10": [math.log10(1.2)],
            "silog": [0.0],
        },
        tol=1e-6,
    )


def test_depth_is_per_image_then_averaged_and_ignores_invalid():
    gt = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [float("nan"), 0.0]]])
    pred = torch.tensor([[[2.0, 3.0], [4.0, 5.0]], [[5.0, 100.0], [100.0, 100.0]]])
    m = M.depth_metrics(pred, gt)
    assert m["rmse"].tolist() == pytest.approx([1.0, 3.0])  # pooled would be sqrt(13/5)
    meter = M.MeanMeter()
    meter.update(m)
    assert meter.result()["rmse"] == pytest.approx(2.0)
    # an image without valid pixels is dropped, not averaged as zero
    m = M.depth_metrics(pred, torch.stack([gt[0], torch.zeros(2, 2)]))
    assert m["rmse"].tolist() == pytest.approx([1.0])


def test_crops_and_max_depth():
    mask = M.crop_mask(480, 640, "eigen")
    assert mask.sum() == 426 * 560 and mask[45, 41] and not mask[44, 41] and not mask[45, 601]
    g = M.crop_mask(375, 1242, "garg")
    assert g.sum() == (int(0.99189189 * 375) - int(0.40810811 * 375)) * (
        int(0.96405229 * 1242) - int(0.03594771 * 1242)
    )
    gt = torch.tensor([[[1.0, 11.0, 0.0, float("inf")]]])
    assert M.depth_valid(gt, max_depth=10).tolist() == [[[True, False, False, False]]]
    with pytest.raises(Exception, match="unknown depth evaluation crop"):
        M.crop_mask(4, 4, "nope")


def test_probe3d_scale_aware_and_known_scale_shift():
    gt = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    pred = (gt - 1.0) / 2.0  # gt = 2 * pred + 1 exactly
    s, t = M.fit_scale_shift(pred, gt, gt > 0)
    assert (float(s), float(t)) == pytest.approx((2.0, 1.0))
    si = M.probe3d_depth_metrics(pred, gt, scale_invariant=True)
    _close(si, {"d1": [1.0], "d2": [1.0], "d3": [1.0], "rmse": [0.0]}, tol=1e-9)
    sa = M.probe3d_depth_metrics(pred, gt)
    # errors: 1, 1.5, 2.5, 4.5; ratios: gt/max(pred,1e-9) -> 1e9, 4, 2.67, 2.29
    _close(sa, {"d1": [0.0], "d3": [0.0], "rmse": [math.sqrt((1 + 2.25 + 6.25 + 20.25) / 4)]})
    # invalid pixels take no part in the fit
    gt2 = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
    pred2 = torch.tensor([[[0.0, 0.5], [1.5, 99.0]]])
    s, t = M.fit_scale_shift(pred2, gt2, gt2 > 0)
    assert (float(s), float(t)) == pytest.approx((2.0, 1.0))
    # singular system (constant prediction) -> identity
    s, t = M.fit_scale_shift(torch.ones(1, 2, 2), gt, gt > 0)
    assert (float(s), float(t)) == (1.0, 0.0)


def _rot_x(n, deg):
    a = math.radians(deg)
    R = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return torch.einsum("ij,jhw->ihw", R, n)


def test_normals_known_rotation():
    gt = torch.zeros(1, 3, 1, 4)
    gt[:, 2] = 1.0
    gt[:, :, :, 3] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1)  # a different gt direction
    angles = [5.0, 20.0, 40.0, 40.0]
    pred = torch.cat([_rot_x(gt[0, :, :, i : i + 1], a) for i, a in enumerate(angles)], dim=-1)[None]
    pred = pred * 3.0  # metrics must not depend on the predicted length
    m = M.normals_metrics(pred, gt)
    _close(
        m,
        {
            "rmse": [math.sqrt((25 + 400 + 1600 + 1600) / 4)],
            "mean": [26.25],
            "median": [30.0],
            "a11": [25.0],
            "a22": [50.0],
            "a30": [50.0],
        },
        tol=1e-6,
    )
    # invalid (zero) ground truth is excluded; per-image averaging
    gt2 = gt.clone()
    gt2[..., 2:] = 0
    m2 = M.normals_metrics(torch.cat([pred, pred]), torch.cat([gt, gt2]))
    assert m2["mean"].tolist() == pytest.approx([26.25, 12.5])


def test_miou_hand_example_with_ignore_and_reduce_zero_label():
    gt = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    meter = M.SegMeter(num_classes=4)
    meter.update(pred, gt)
    iou = meter.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(iou[3])
    r = meter.result()
    assert r["mIoU"] == pytest.approx(100 / 3)  # class 3 is absent from gt and prediction
    assert r["aAcc"] == pytest.approx(100 * 3 / 5)
    assert r["mAcc"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)
    # the same with labels stored 1-based and 0 = unlabelled
    raw = torch.where(gt == 255, torch.zeros_like(gt), gt + 1)
    assert M.miou(pred, raw, 4, reduce_zero_label=True) == pytest.approx(100 / 3)
    # accumulates over images (dataset-level I and U, not a mean of per-image IoUs)
    meter = M.SegMeter(2)
    meter.update(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]))
    meter.update(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))
    assert meter.per_class_iou().tolist() == pytest.approx([1 / 2, 4 / 5])


def test_meters_of_two_shards_merge_to_the_whole_split():
    """A data-parallel test: ranks test strided shares; the merged meters give the whole split's metrics."""
    import torch

    from tasks.metrics import MeanMeter, SegMeter

    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (6, 5, 5), generator=g)
    gts = torch.randint(0, 4, (6, 5, 5), generator=g)
    gts[0, 0, 0] = 255  # an ignored pixel
    whole, shards = SegMeter(4), [SegMeter(4), SegMeter(4)]
    mean, mshards = MeanMeter(), [MeanMeter(), MeanMeter()]
    for i in range(6):
        whole.update(preds[i : i + 1], gts[i : i + 1])
        shards[i % 2].update(preds[i : i + 1], gts[i : i + 1])
        v = {"rmse": torch.tensor([float(i) ** 0.5])}
        mean.update(v)
        mshards[i % 2].update(v)
    assert shards[0].merge(shards[1]).result() == whole.result()
    assert mshards[0].merge(mshards[1]).result()["rmse"] == pytest.approx(mean.result()["rmse"], rel=1e-15)
    assert mean.result()["rmse"] == pytest.approx(sum(i**0.5 for i in range(6)) / 6)
