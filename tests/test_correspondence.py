"""Training-free correspondence: hand-built matching, metrics with hand-computed values, the pair
pipelines on constructed geometry with an oracle backbone, and synth_corr end to end with tiny_vit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.cameras import look_at, relative_rotation_deg
from bench.config import compose
from bench.errors import DataMissingError
from bench.registry import TASKS
from tasks.correspondence import depth_pair_errors, summarise_pixel_pairs, transfer_keypoints, xyz_pair_errors
from tasks.matching import match_ratio_topk, nn2, pck_hits, ratio_weights, recalls, rotation_binned

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------ matching
def test_hand_built_matching_ratio_test_and_topk_order():
    e = torch.eye(3)
    refs = torch.stack([e[0], e[1], e[1], e[2]])  # r1 and r2 are identical: q1 is ambiguous
    q = torch.tensor(
        [
            [1.0, 0, 0],  # q0 -> r0, d = (0, 1), weight ~1
            [0.0, 1, 0],  # q1 -> r1 or r2, d = (0, 0), weight 0
            [0.6, 0, 0.8],  # q2 -> r3, d = (0.2, 0.4), weight 0.5
            [0.28, 0, 0.96],
        ]
    )  # q3 -> r3, d = (0.04, 0.72), weight 1 - 1/18
    dist, idx = nn2(q, refs)
    assert torch.allclose(dist[2], torch.tensor([0.2, 0.4])) and idx[2, 0] == 3 and idx[3, 0] == 3
    w = ratio_weights(dist)
    assert torch.allclose(w, torch.tensor([1.0, 0.0, 0.5, 1 - 0.04 / 0.72]), atol=1e-6)

    ia, ib, wt = match_ratio_topk(q, refs, num=3)
    assert ia.tolist() == [0, 3, 2] and ib.tolist() == [0, 3, 3]  # best first; the ambiguous q1 drops out
    assert torch.allclose(wt, torch.tensor([1.0, 1 - 0.04 / 0.72, 0.5]), atol=1e-6)
    ia, ib, _ = match_ratio_topk(q, refs, num=None, max_ratio=0.4)  # Lowe: reject ratio > 0.4 (q1: 1, q2: 0.5)
    assert ia.tolist() == [0, 3]
    # scale-invariant (L2-normalised) and chunking does not change the result
    ia2, ib2, _ = match_ratio_topk(5 * q, 0.1 * refs, num=3, chunk_elems=4)
    assert ia2.tolist() == [0, 3, 2] and ib2.tolist() == [0, 3, 3]


def test_nn2_chunked_equals_dense_and_single_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(257, 16, generator=g), torch.randn(300, 16, generator=g)
    d1, i1 = nn2(a, b)
    d2, i2 = nn2(a, b, chunk_elems=1000)  # 3 rows at a time
    assert torch.equal(i1, i2) and torch.allclose(d1, d2)
    sim = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    assert torch.equal(i1[:, 0], sim.argmax(1))
    d, i = nn2(a[:2], b[:1])
    assert (d[:, 1] == 2).all() and (i == 0).all()


# ------------------------------------------------------------------------------------ metrics
def test_recalls_and_rotation_binning_on_constructed_poses():
    eye = torch.tensor([0.0, 0.0, 0.0])

    def cam(yaw_deg):  # camera at the origin looking along a direction rotated about world z
        a = math.radians(yaw_deg)
        return look_at(eye, torch.tensor([math.cos(a), math.sin(a), 0.0]))

    w2c = {d: cam(d) for d in (0, 10, 20, 45, 100)}
    ang = torch.stack([relative_rotation_deg(w2c[0], w2c[d]) for d in (10, 20, 45, 100)])
    assert torch.allclose(ang, torch.tensor([10.0, 20.0, 45.0, 100.0]), atol=1e-3)

    errs = [torch.tensor([1.0, 6, 12, 30]), torch.tensor([4.0, 9, 25]), torch.tensor([11.0]), torch.tensor([0.5, 50])]
    results = [{"err": e, "angle": float(a)} for e, a in zip(errs, ang)]
    results.append({"err": torch.zeros(0), "angle": 5.0})  # a pair without matches is counted, not averaged
    m = summarise_pixel_pairs(
        results, {"px_thresholds": [5, 10, 20], "binned_threshold": 10, "rotation_bins": [0, 15, 30, 60, 180]}
    )
    # pooled over the 10 matches: < 5 px: 1, 4, 0.5 -> 3; < 10: + 6, 9 -> 5; < 20: + 12, 11 -> 7
    assert m["recall_5px"] == pytest.approx(30.0) and m["recall_10px"] == pytest.approx(50.0)
    assert m["recall_20px"] == pytest.approx(70.0)
    # per-pair 10 px recall: 50 (10 deg), 66.7 (20 deg), 0 (45 deg), 50 (100 deg)
    assert m["recall_10px_rot0_15"] == pytest.approx(50.0) and m["recall_10px_rot15_30"] == pytest.approx(200 / 3)
    assert m["recall_10px_rot30_60"] == pytest.approx(0.0) and m["recall_10px_rot60_180"] == pytest.approx(50.0)
    assert m["pairs"] == 4 and m["pairs_without_matches"] == 1 and m["pairs_rot0_15"] == 1

    b = rotation_binned(torch.tensor([100.0, 0.0]), torch.tensor([70.0, 80.0]), [0, 30, 60, 90, 120], "r")
    assert b == {
        "pairs_rot0_30": 0.0,
        "pairs_rot30_60": 0.0,
        "pairs_rot60_90": 2.0,
        "r_rot60_90": 50.0,
        "pairs_rot90_120": 0.0,
    }  # empty bins carry a count but no (NaN) mean
    assert recalls(torch.tensor([1.0, float("inf")]), [5]) == [50.0]


def test_pck_on_hand_made_keypoints():
    gt = torch.zeros(4, 2)
    pred = torch.tensor([[1.9, 0.0], [0.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    bbox = torch.tensor([2.0, 3.0, 22.0, 13.0])  # 20 x 10: threshold 0.1 * 20 = 2 px
    assert pck_hits(pred, gt, bbox, 0.1).tolist() == [True, False, True, False]
    assert pck_hits(pred, gt, bbox, 0.2).tolist() == [True, True, True, True]


# ------------------------------------------------------------------------------------ oracle backbones
class LookupBackbone(nn.Module):
    """Features = a fixed random 32-d code of each pixel's red value (patch size 1): an 'oracle' that
    matches exactly the pixels showing the same surface patch."""

    patch_size, embed_dim, resize_mode = 1, 32, "resize"

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5))
        self.table = nn.Parameter(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)), requires_grad=False)

    def grid_size(self, H, W):
        return H, W

    def layers(self, images, idx=None, norm=True):  # an oracle has no final norm: same map either way
        return [self.forward(images)]

    def forward(self, images):
        # extract_features remaps x -> mean + std * (x - 0.5) / 0.5, the identity for mean = std = 0.5
        code = (images[:, 0] * 255).round().long().clamp(0, 255)
        return self.table[code].permute(0, 3, 1, 2)


def shifted_plane_pair(shift_quarter_px: int = 1):
    """A textured fronto-parallel plane at z = 2 m seen by two cameras 32x32 (f = 16) translated along
    x so that the image moves by exactly 4 * shift pixels (one quarter-grid cell per unit)."""
    g = np.random.default_rng(0)
    blocks = g.permutation(250)[: 8 * 8 + 8 * shift_quarter_px].reshape(8, 8 + shift_quarter_px) + 1  # unique ids
    world = np.kron(blocks, np.ones((4, 4)))  # 4x4-pixel blocks
    img_a = world[:, shift_quarter_px * 4 :]  # camera a sees columns shifted
    img_b = world[:, :32]
    images = torch.zeros(2, 3, 32, 32)
    images[0, 0], images[1, 0] = torch.tensor(img_a / 255.0), torch.tensor(img_b / 255.0)
    K = torch.tensor([[16.0, 0, 16], [0, 16.0, 16], [0, 0, 1]])
    w2c_a, w2c_b = torch.eye(4), torch.eye(4)
    # a point at pixel u in a is at u + 4*shift in b: u_b = u_a + f * (t_b - t_a) / z
    w2c_b[0, 3] = 4.0 * shift_quarter_px * 2.0 / 16.0
    return {
        "images": images,
        "depth": torch.full((2, 32, 32), 2.0),
        "K": torch.stack([K, K]),
        "w2c": torch.stack([w2c_a, w2c_b]),
    }


def test_depth_pair_pipeline_exact_on_shifted_plane():
    bb, s = LookupBackbone(), shifted_plane_pair(1)
    base = {"image_size": None, "input_norm": [0.5, 0.5], "depth_scale": 0.25}
    # all 64 view-0 points as queries; 8 of them (last column) leave view 1 and cannot be right
    r = depth_pair_errors(bb, s, {**base, "queries": "all", "num_corr": None})
    assert r["err"].numel() == 64 and int((r["err"] == 0).sum()) == 56 and r["err"].max() >= 1
    # top-56 by ratio weight are exactly the 56 exact matches (distance 0 -> weight 1)
    r = depth_pair_errors(bb, s, {**base, "queries": "all", "num_corr": 56})
    assert torch.equal(r["err"], torch.zeros(56)) and r["angle"] == pytest.approx(0.0)
    # covisible queries (occlusion/visibility test of bench.cameras.dense_correspondence) drop the 8
    r = depth_pair_errors(bb, s, {**base, "queries": "covisible", "num_corr": 1000})
    assert torch.equal(r["err"], torch.zeros(56))


def test_xyz_pair_pipeline_exact_on_shifted_plane():
    bb, s = LookupBackbone(), shifted_plane_pair(1)
    r = xyz_pair_errors(bb, s, {"input_norm": [0.5, 0.5], "xyz_scale": 0.25, "num_corr": 56})
    assert r["err3d"].numel() == 56 and r["err3d"].max() < 1e-5 and r["err2d"].max() < 1e-3


class GridCodeBackbone(LookupBackbone):
    """Features = one-hot of the patch index on a 3x3 grid of 10-px patches, whatever the image."""

    patch_size = 10

    def grid_size(self, H, W):
        return H // 10, W // 10

    def forward(self, images):
        B, _, H, W = images.shape
        h, w = H // 10, W // 10
        return torch.eye(h * w).reshape(h * w, h, w)[None].expand(B, -1, -1, -1)


def test_keypoint_transfer_hand_computed():
    s = {
        "image_src": torch.rand(3, 20, 30),
        "image_trg": torch.rand(3, 20, 30),
        "kps_src": torch.tensor([[1.0, 2.0], [10.0, 12.0], [29.0, 19.0]]),
    }
    # padded to 30x30, size 30 -> scale 1; kp centres (1.5,2.5), (10.5,12.5), (29.5,19.5) fall in patches
    # (0,0), (1,1), (1,2) whose centres (5,5), (15,15), (25,15) -> minus 0.5 in original pixels
    pred = transfer_keypoints(GridCodeBackbone(), s, {"image_size": 30})
    assert pred.tolist() == [[4.5, 4.5], [14.5, 14.5], [24.5, 14.5]]


def test_spair_task_end_to_end_on_fixture(tmp_path):
    from test_readers import make_spair

    make_spair(tmp_path / "SPair-71k")
    cfg = compose(
        [
            "task=spair_corr",
            f"paths.data_dir={tmp_path}",
            "task.protocol.image_size=30",
            "task.dataset.kwargs.pairs_per_category=null",
            "task.protocol.mode=centre",
            "task.dataset.kwargs.sampling=per_category",
        ]
    )
    task = TASKS.get("spair_corr")()
    task.check(cfg)
    m = task.evaluate(GridCodeBackbone(), cfg, tmp_path / "work")
    # per pair: src (1,2) -> (4.5,4.5) vs trg (3,4): 1.58 px < 2 (hit); (10,12) -> (14.5,14.5) vs (20,15): miss
    assert m["pck_0.1"] == pytest.approx(50.0) and m["pck_0.1_cat"] == pytest.approx(50.0)
    assert m["pck_0.1_vp0"] == m["pck_0.1_vp1"] == m["pck_0.1_vp2"] == pytest.approx(50.0) and m["pairs"] == 3


def test_real_dataset_tasks_fail_early_naming_the_root(tmp_path):
    for name in ("scannet_corr", "navi_corr", "spair_corr"):
        cfg = compose([f"task={name}", f"paths.data_dir={tmp_path}/nowhere"])
        with pytest.raises(DataMissingError) as e:
            TASKS.get(name)().check(cfg)
        assert f"{tmp_path}/nowhere" in str(e.value) and "python -m bench data" in str(e.value)


# ------------------------------------------------------------------------------------ end to end
def test_synth_corr_end_to_end_tiny_vit(tmp_path):
    from bench.backbones import build_backbone

    cfg = compose(
        [
            "task=synth_corr",
            "backbone=tiny_vit",
            f"paths.data_dir={tmp_path}",
            "task.dataset.scenes=1",
            "task.dataset.views=4",
            "task.dataset.size=[48,48]",
            "task.dataset.eval_scenes=all",
            "task.protocol.view_gaps=[1,2]",
            "task.protocol.pairs_per_gap=2",
            "task.protocol.min_overlap=0.05",
        ]
    )
    torch.manual_seed(0)
    bb = build_backbone(cfg.backbone).eval()
    m = TASKS.get("synth_corr")().evaluate(bb, cfg, tmp_path / "work")
    assert m["pairs"] + m["pairs_skipped_overlap"] == 4 and m["pairs"] >= 1
    for k in ("recall_5px", "recall_10px", "recall_20px"):
        assert 0.0 <= m[k] <= 100.0
    assert m["recall_5px"] <= m["recall_10px"] <= m["recall_20px"]
    assert all(math.isfinite(v) for v in m.values())
    rows = json.loads((tmp_path / "work" / "pairs.json").read_text())
    assert len(rows) == m["pairs"] and all(r["matches"] > 0 for r in rows)


# ------------------------------------------------------------------------------------ issue 13: Probe3D fidelity
def test_correspondence_features_are_last_block_without_final_norm_centre_padded():
    """Probe3D evals/models/dino.py: the last block's patch tokens, no final LayerNorm, after
    evals/models/utils.py center_padding (zeros after normalisation); a 480x640 image -> 490x644 at /14."""
    from bench.backbones import build_backbone
    from tasks.matching import center_pad, center_pad_offsets, extract_features, feature_extent

    for task in ("scannet_corr", "navi_corr", "spair_corr"):
        proto = compose([f"task={task}"]).task.protocol
        assert proto.final_norm is False and proto.pad == "center" and proto.layers is None
    assert center_pad_offsets(480, 640, 14) == (2, 2, 5, 5)  # 644 - 640 = 4 -> 2/2, 490 - 480 = 10 -> 5/5
    assert center_pad_offsets(800, 800, 14) == (6, 6, 6, 6) and center_pad_offsets(28, 14, 14) == (0, 0, 0, 0)
    torch.manual_seed(0)
    bb = build_backbone(compose(["backbone=tiny_vit"]).backbone).eval()
    x = torch.rand(1, 3, 480, 640)
    padded = center_pad(bb, x)
    assert padded.shape[-2:] == (490, 644) and torch.equal(padded[..., 5:485, 2:642], x)
    assert not torch.allclose((padded - bb.mean) / bb.std, torch.zeros(()), atol=1e-6)  # the image is not zero
    assert torch.allclose(((padded - bb.mean) / bb.std)[..., :5, :], torch.zeros(()), atol=1e-6)  # the border is
    y = torch.rand(1, 3, 56, 70)  # a patch multiple: no padding at all
    with torch.no_grad():
        raw = extract_features(bb, y, final_norm=False, pad="center")
        assert torch.allclose(raw, bb.layers(y, [-1], norm=False)[0])
        assert not torch.allclose(raw, bb(y), atol=1e-3)  # the final LayerNorm changes the map
        # Probe3D center_padding: 60 -> 70 and the width, already a multiple (70), gets a whole patch: 84
        assert extract_features(bb, x[..., :60, :70], final_norm=False, pad="center").shape[-2:] == (5, 6)
    assert feature_extent(bb, 480, 640, "center") == (480.0, 640.0)  # the map is spread over the image


def test_spair_probe3d_exact_mode_hand_computed(tmp_path):
    """Probe3D evaluate_spair_correspondence.py compute_errors on a 3x3 one-hot patch grid (patch 10,
    image 30): source kp (1,2) samples (align_corners=True) mostly patch (0,0) -> prediction its corner
    (0,0); kp (10,12) sits at feature coordinate (0.67, 0.8) -> patch (1,1) -> (1/3, 1/3). Target kps
    (3,4), (20,15), bbox side 20 of a 30-px image: errors 0.1667 / (20/30) = 0.25 and 0.559. At alpha 0.3
    the exact mode hits 1 of 2; the centre mode (patch centres, PCK of the bbox: 1.6 and 5.5 px < 6) both."""
    from test_readers import make_spair

    from tasks.correspondence import keypoint_hits_probe3d

    s = {
        "image_src": torch.rand(3, 20, 30),
        "image_trg": torch.rand(3, 20, 30),
        "kps_src": torch.tensor([[1.0, 2.0], [10.0, 12.0]]),
        "kps_trg": torch.tensor([[3.0, 4.0], [20.0, 15.0]]),
        "bbox_trg": torch.tensor([2.0, 3.0, 22.0, 13.0]),
    }
    proto = {"image_size": 30, "alpha": 0.3, "final_norm": False, "pad": "center"}
    assert keypoint_hits_probe3d(GridCodeBackbone(), s, proto).tolist() == [True, False]
    assert keypoint_hits_probe3d(GridCodeBackbone(), s, dict(proto, alpha=0.26)).tolist() == [True, False]
    assert keypoint_hits_probe3d(GridCodeBackbone(), s, dict(proto, alpha=0.24)).tolist() == [False, False]

    make_spair(tmp_path / "SPair-71k")
    SPair = __import__("bench.registry", fromlist=["DATASETS"]).DATASETS.get("spair71k")
    ds = SPair(tmp_path / "SPair-71k", "test", pairs_per_category=None, sampling="per_bucket")
    assert sorted(str(b) for _, b in ds.items) == ["0", "1", "2", "all", "all", "all"]  # a pair is in 2 samples
    one = SPair(tmp_path / "SPair-71k", "test", pairs_per_category=1, sampling="per_bucket")
    assert [b for _, b in one.items] == [0, 1, 2, "all"] and one[3]["bucket"] == "all"
    cfg = compose(
        [
            "task=spair_corr",
            f"paths.data_dir={tmp_path}",
            "task.protocol.image_size=30",
            "task.protocol.alpha=0.3",
            "task.dataset.kwargs.pairs_per_category=null",
        ]
    )
    assert cfg.task.protocol.mode == "probe3d" and cfg.task.dataset.kwargs.sampling == "per_bucket"
    m = TASKS.get("spair_corr")().evaluate(GridCodeBackbone(), cfg, tmp_path / "work")
    assert m["pck_0.3"] == pytest.approx(50.0) and m["pck_0.3_vp0"] == pytest.approx(50.0) and m["pairs"] == 3
    m = TASKS.get("spair_corr")().evaluate(
        GridCodeBackbone(),
        compose(
            [
                "task=spair_corr",
                f"paths.data_dir={tmp_path}",
                "task.protocol.image_size=30",
                "task.protocol.alpha=0.3",
                "task.dataset.kwargs.pairs_per_category=null",
                "task.protocol.mode=centre",
                "task.dataset.kwargs.sampling=per_category",
            ]
        ),
        tmp_path / "work2",
    )
    assert m["pck_0.3"] == pytest.approx(100.0)
