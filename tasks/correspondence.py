"""Training-free correspondence tasks: ScanNet-1500, NAVI, SPair-71k (Probe3D) and synth_corr.

All four freeze the backbone, extract dense features once per image and match them with
:func:`tasks.matching.match_ratio_topk` (2-NN on L2-normalised features, Lowe's ratio weight, top-k).

* ``scannet_corr`` -- ScanNet-1500 pairs at ``image_size`` (480x640) with ``input_norm`` mean = std =
  0.5; depth and intrinsics scaled by ``depth_scale`` (0.25, nearest); the valid depth pixels of both
  views are back-projected and their features sampled (bilinear) at their pixel centres; view-0
  points are matched to view-1 points; the error of a match is the distance, in the x0.25 image,
  between the ground-truth location of the view-0 point in view 1 and the matched view-1 pixel.
  ``queries: all`` (Probe3D) uses every valid view-0 pixel and its reprojection; ``queries:
  covisible`` keeps only view-0 pixels that are visible in view 1 by the occlusion test of
  :func:`bench.cameras.dense_correspondence`. Recall at 5/10/20 px (percent, pooled over matches) and
  the 10 px per-pair recall averaged within relative-rotation bins [0,15,30,60,180) degrees.
* ``synth_corr`` -- the same computation on pairs of views of the synthetic scenes ``view_gaps``
  frames apart (pairs with less than ``min_overlap`` co-visible pixels are skipped), with per-gap
  recalls added. Ground truth comes from exact rendered depth and poses.
* ``navi_corr`` -- NAVI object pairs at 512x512; xyz grids at x0.25 (every 4th pixel of the
  back-projected depth), features upsampled bicubically to that grid; 3D error (metres) between the
  view-0 point moved into view 1 and the matched view-1 point, 2D error between their projections in
  the 512 image; recall at 1/2/5 cm and 5/25/50 px; 2 cm per-pair recall in rotation bins
  [0,30,60,90,120).
* ``spair_corr`` -- SPair-71k keypoint transfer: both images padded (bottom/right, white) to a square,
  resized to ``image_size`` (800); each source keypoint's feature is compared by cosine to every target
  patch. ``mode: probe3d`` (default; Probe3D ``evaluate_spair_correspondence.py``): PIL bicubic resize,
  integer keypoints, ``grid_sample(align_corners=True)``, prediction at the arg-max patch's corner on the
  centre-padded canvas, error / (bbox side / image side) < ``alpha``, recall pooled per category and
  viewpoint bucket over separate seeded 200-pair samples (0, 1, 2, all), averaged over categories.
  ``mode: centre`` (bench's own): bilinear features at keypoint centres, prediction at the patch centre
  mapped to original pixels, PCK@``alpha`` (0.1) of the target bbox's longer side.
  Feature rule of all Probe3D correspondence tasks: ``final_norm: false`` (the last block's tokens, as
  Probe3D's DINO wrapper) and ``pad: center`` (Probe3D ``center_padding``).

Config: ``cfg.task`` has ``name``, ``dataset`` (see tasks/data.py; synth_corr: generator settings),
``protocol`` (every knob above; copied into the record) and ``report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.cameras import (
    dense_correspondence,
    invert_rigid,
    pixel_grid,
    project_points,
    relative_rotation_deg,
    scale_intrinsics,
    transform_points,
    unproject_depth,
)
from bench.backbones import module_device
from bench.config import to_container
from bench.errors import BenchError
from bench.io import write_json
from bench.registry import TASKS

from .matching import (
    extract_features,
    feature_extent,
    match_ratio_topk,
    pck_hits,
    recalls,
    rotation_binned,
    sample_features,
)


def _progress(it: Iterable, total: int, desc: str) -> Iterable:
    from bench.progress import progress  # a bar on a terminal, periodic log lines otherwise (SLURM logs)

    return progress(it, total=total, desc=desc, unit="pair")


def _pair_size(size: Optional[Sequence[int]], H: int, W: int) -> Tuple[int, int]:
    if size is None:
        return H, W
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _fmt(t: float) -> str:
    return f"{t:g}"


def _features(backbone, images: Tensor, proto: Mapping[str, Any]) -> Tensor:
    """Dense features as the protocol says: ``layers``, ``input_norm``, ``final_norm`` (Probe3D: false,
    the last block's tokens as its DINO wrapper returns them), ``pad`` (Probe3D: center)."""
    return extract_features(
        backbone,
        images,
        proto.get("layers"),
        proto.get("input_norm"),
        bool(proto.get("final_norm", True)),
        proto.get("pad"),
    )


# ----------------------------------------------------------------------------------- depth pairs
def pair_depth_intrinsics(
    sample: Mapping[str, Tensor], image_hw: Tuple[int, int], scale: float
) -> Tuple[Tensor, Tuple[int, int]]:
    """The intrinsics ``[2,3,3]`` and size of the depth grid the errors are measured on: the depth maps'
    own K (``K_depth``; ``K`` when a reader gives none) scaled once, from the stored depth size to
    ``round(image_hw * scale)`` (Probe3D: ``K[:2] *= 0.25`` on the 640x480 depth K)."""
    Kd = sample.get("K_depth", sample["K"]).float()
    Hd, Wd = sample["depth"].shape[-2:]
    H, W = image_hw
    Hq, Wq = max(1, round(H * scale)), max(1, round(W * scale))
    return scale_intrinsics(Kd, Wq / Wd, Hq / Hd), (Hq, Wq)


def depth_pair_errors(backbone, sample: Mapping[str, Tensor], proto: Mapping[str, Any]) -> Dict[str, Any]:
    """Reprojection errors (pixels of the depth-scaled image) of the matches of one two-view sample
    (``images [2,3,H,W]``, ``depth [2,Hd,Wd]``, ``K [2,3,3]``, ``w2c [2,4,4]``, optional ``K_depth``)."""
    dev = module_device(backbone)
    images = sample["images"].to(dev).float()
    depth = sample["depth"].to(dev).float()
    w2c = sample["w2c"].to(dev).float()
    H0, W0 = images.shape[-2:]
    H, W = _pair_size(proto.get("image_size"), H0, W0)
    if (H, W) != (H0, W0):
        images = F.interpolate(
            images, size=(H, W), mode="bilinear", align_corners=False, antialias=H < H0 or W < W0
        ).clamp(0, 1)
    Kq, (Hq, Wq) = pair_depth_intrinsics(sample, (H, W), float(proto.get("depth_scale", 0.25)))
    Kq = Kq.to(dev)
    depth_q = F.interpolate(depth[:, None], size=(Hq, Wq), mode="nearest")[:, 0]

    with torch.no_grad():
        feats = _features(backbone, images, proto).float()
    extent = feature_extent(backbone, H, W, proto.get("pad"))
    uv_q = pixel_grid(Hq, Wq, device=dev)  # [Hq,Wq,2]
    to_img = uv_q.new_tensor([W / Wq, H / Hq])
    valid_a, valid_b = depth_q[0] > 0, depth_q[1] > 0
    if proto.get("queries", "all") == "covisible":
        uv_gt, qmask = dense_correspondence(
            depth_q[0], Kq[0], w2c[0], depth_q[1], Kq[1], w2c[1], rel_tol=float(proto.get("occlusion_tol", 0.01))
        )
        behind = torch.zeros_like(qmask)
    else:
        pts = unproject_depth(depth_q[0], Kq[0], w2c[0])
        uv_gt, z = project_points(pts, Kq[1], w2c[1])
        qmask, behind = valid_a, z <= 0
    angle = float(relative_rotation_deg(w2c[0], w2c[1]))
    if int(qmask.sum()) == 0 or int(valid_b.sum()) == 0:
        return {"err": torch.zeros(0), "angle": angle}
    fa = sample_features(feats[0], uv_q[qmask] * to_img, extent)
    fb = sample_features(feats[1], uv_q[valid_b] * to_img, extent)
    ia, ib, _ = match_ratio_topk(
        fa, fb, proto.get("num_corr", 1000), proto.get("max_ratio"), int(proto.get("chunk_elems", 1 << 24))
    )
    err = (uv_gt[qmask][ia] - uv_q[valid_b][ib]).norm(dim=-1)
    err = torch.where(behind[qmask][ia], torch.full_like(err, float("inf")), err)
    return {"err": err.cpu(), "angle": angle}


def summarise_pixel_pairs(results: List[Dict[str, Any]], proto: Mapping[str, Any]) -> Dict[str, float]:
    """Pooled recalls at ``px_thresholds`` and the ``binned_threshold`` recall per rotation bin."""
    used = [r for r in results if r["err"].numel() > 0]
    if not used:
        raise BenchError(
            "no correspondences could be evaluated (no valid depth / no co-visible pixels in any pair)",
            "check the dataset's depth maps and the pair list",
        )
    thresholds = list(proto.get("px_thresholds", [5, 10, 20]))
    err = torch.cat([r["err"] for r in used])
    out = {f"recall_{_fmt(t)}px": v for t, v in zip(thresholds, recalls(err, thresholds))}
    bt = float(proto.get("binned_threshold", 10))
    per_pair = torch.tensor([100.0 * (r["err"] < bt).float().mean().item() for r in used])
    angles = torch.tensor([r["angle"] for r in used])
    out.update(
        rotation_binned(per_pair, angles, proto.get("rotation_bins", [0, 15, 30, 60, 180]), f"recall_{_fmt(bt)}px")
    )
    out["pairs"] = float(len(used))
    out["pairs_without_matches"] = float(len(results) - len(used))
    return out


def _save_pairs(workdir: Path, ids: List[str], results: List[Dict[str, Any]], thr: float, key: str = "err") -> None:
    rows = [
        {
            "id": i,
            "angle": round(r["angle"], 3),
            "matches": int(r[key].numel()),
            "recall": round(100.0 * (r[key] < thr).float().mean().item(), 3) if r[key].numel() else None,
        }
        for i, r in zip(ids, results)
    ]
    write_json(Path(workdir) / "pairs.json", rows)


def _open_test(cfg) -> Any:
    from .data import open_split

    return open_split(cfg.task.dataset, "test")


class _RealDatasetTask:
    """Tasks on a prepared real dataset: ``check`` fails early, naming what is missing."""

    def check(self, cfg) -> None:
        from .data import check_dataset

        check_dataset(cfg.task.dataset)


@TASKS.register("scannet_corr", "ScanNet-1500 pairs: training-free 2-NN ratio matching, recall at 5/10/20 px (Probe3D)")
class ScanNetCorrespondence(_RealDatasetTask):
    def evaluate(self, backbone, cfg, workdir: Path) -> Dict[str, float]:
        proto = to_container(cfg.task.protocol)
        ds = _open_test(cfg)
        ids, results = [], []
        for i in _progress(range(len(ds)), len(ds), "scannet pairs"):
            s = ds[i]
            results.append(depth_pair_errors(backbone, s, proto))
            ids.append(str(s.get("id", i)))
        _save_pairs(workdir, ids, results, float(proto.get("binned_threshold", 10)))
        return summarise_pixel_pairs(results, proto)


# ----------------------------------------------------------------------------------- synthetic pairs
def synthetic_pairs(
    scenes, scene_ids: Sequence[str], gaps: Sequence[int], per_gap: Optional[int]
) -> List[Tuple[str, int, int, int]]:
    """``(scene, i, j, gap)`` with ``j = i + gap``; per scene and gap at most ``per_gap`` pairs, spread
    evenly over the trajectory."""
    out = []
    for sid in scene_ids:
        V = scenes.num_views(sid)
        for g in gaps:
            starts = list(range(0, V - int(g)))
            if per_gap is not None and len(starts) > per_gap:
                starts = [starts[round(k * (len(starts) - 1) / max(per_gap - 1, 1))] for k in range(per_gap)]
            out += [(sid, i, i + int(g), int(g)) for i in sorted(set(starts))]
    return out


@TASKS.register("synth_corr", "synthetic scenes: view pairs at controlled gaps, ScanNet-style matching + recalls")
class SynthCorrespondence:
    def evaluate(self, backbone, cfg, workdir: Path) -> Dict[str, float]:
        from bench.data.scenes import MultiViewScenes
        from bench.data.synthetic import ensure_synthetic, split_scenes

        ds_cfg, proto = to_container(cfg.task.dataset), to_container(cfg.task.protocol)
        root = ensure_synthetic(
            ds_cfg["root"],
            scenes=int(ds_cfg.get("scenes", 8)),
            views=int(ds_cfg.get("views", 24)),
            size=list(ds_cfg.get("size", [224, 224])),
            seed=int(ds_cfg.get("seed", 0)),
        )
        scenes = MultiViewScenes(root)
        ids = scenes.scene_ids
        if ds_cfg.get("eval_scenes", "held_out") == "held_out":
            ids = split_scenes(ids, ds_cfg.get("held_out", 0.25))[1] or ids
        pairs = synthetic_pairs(scenes, ids, proto.get("view_gaps", [2, 4, 8]), proto.get("pairs_per_gap"))
        min_overlap = float(proto.get("min_overlap", 0.1))
        results, kept = [], []
        for sid, i, j, g in _progress(pairs, len(pairs), "synthetic pairs"):
            s = scenes.load_views(sid, [i, j])
            d = s["depth"]
            _, vis = dense_correspondence(d[0], s["K"][0], s["w2c"][0], d[1], s["K"][1], s["w2c"][1])
            if vis.float().mean().item() < min_overlap:
                continue
            r = depth_pair_errors(backbone, s, proto)
            r["gap"] = g
            results.append(r)
            kept.append(f"{sid}:{i}-{j}")
        if not results:
            raise BenchError(
                f"no synthetic pair reaches min_overlap={min_overlap}",
                "lower task.protocol.min_overlap or use smaller task.protocol.view_gaps",
            )
        _save_pairs(workdir, kept, results, float(proto.get("binned_threshold", 10)))
        out = summarise_pixel_pairs(results, proto)
        bt = float(proto.get("binned_threshold", 10))
        for g in proto.get("view_gaps", [2, 4, 8]):
            errs = [r["err"] for r in results if r["gap"] == int(g) and r["err"].numel()]
            if errs:
                out[f"recall_{_fmt(bt)}px_gap{int(g)}"] = recalls(torch.cat(errs), [bt])[0]
        out["pairs_skipped_overlap"] = float(len(pairs) - len(results))
        return out


# ----------------------------------------------------------------------------------- NAVI
def xyz_pair_errors(backbone, sample: Mapping[str, Tensor], proto: Mapping[str, Any]) -> Dict[str, Any]:
    """3D (metres) and 2D (pixels of the full image) errors of the matches of one NAVI pair."""
    dev = module_device(backbone)
    images = sample["images"].to(dev).float()
    depth, K, w2c = sample["depth"].to(dev).float(), sample["K"].to(dev).float(), sample["w2c"].to(dev).float()
    H, W = images.shape[-2:]
    step = max(1, round(1.0 / float(proto.get("xyz_scale", 0.25))))
    with torch.no_grad():
        feats = _features(backbone, images, proto).float()
    extent = feature_extent(backbone, H, W, proto.get("pad"))
    if "xyz" in sample:  # the reader's xyz grid (NAVI: Probe3D's, back-projected before the object crop)
        xyz = sample["xyz"].to(dev).float().permute(0, 2, 3, 1)[:, ::step, ::step]
    else:
        xyz = unproject_depth(depth, K)[:, ::step, ::step]  # [2,Hq,Wq,3] camera frames
    valid = depth[:, ::step, ::step] > 0
    uv = pixel_grid(*valid.shape[-2:], device=dev) * step  # quarter-cell centres, image px
    mode = proto.get("feature_upsample", "bicubic")
    angle = float(relative_rotation_deg(w2c[0], w2c[1]))
    if int(valid[0].sum()) == 0 or int(valid[1].sum()) == 0:
        return {"err3d": torch.zeros(0), "err2d": torch.zeros(0), "angle": angle}
    fa = sample_features(feats[0], uv[valid[0]], extent, mode)
    fb = sample_features(feats[1], uv[valid[1]], extent, mode)
    ia, ib, _ = match_ratio_topk(
        fa, fb, proto.get("num_corr", 1000), proto.get("max_ratio"), int(proto.get("chunk_elems", 1 << 24))
    )
    T_ab = w2c[1] @ invert_rigid(w2c[0])
    pa = transform_points(T_ab, xyz[0][valid[0]][ia])
    pb = xyz[1][valid[1]][ib]
    uva, _ = project_points(pa, K[1])
    uvb, _ = project_points(pb, K[1])
    return {"err3d": (pa - pb).norm(dim=-1).cpu(), "err2d": (uva - uvb).norm(dim=-1).cpu(), "angle": angle}


@TASKS.register("navi_corr", "NAVI object pairs: training-free matching, recall at 1/2/5 cm and 5/25/50 px (Probe3D)")
class NAVICorrespondence(_RealDatasetTask):
    def evaluate(self, backbone, cfg, workdir: Path) -> Dict[str, float]:
        proto = to_container(cfg.task.protocol)
        ds = _open_test(cfg)
        ids, results = [], []
        for i in _progress(range(len(ds)), len(ds), "navi pairs"):
            s = ds[i]
            results.append(xyz_pair_errors(backbone, s, proto))
            ids.append(str(s.get("id", i)))
        used = [r for r in results if r["err3d"].numel()]
        if not used:
            raise BenchError("no NAVI pair has valid depth in both views", "check the NAVI depth maps")
        m_thr = list(proto.get("metric_thresholds", [0.01, 0.02, 0.05]))
        px_thr = list(proto.get("px_thresholds", [5, 25, 50]))
        e3, e2 = torch.cat([r["err3d"] for r in used]), torch.cat([r["err2d"] for r in used])
        out = {f"recall_{_fmt(t * 100)}cm": v for t, v in zip(m_thr, recalls(e3, m_thr))}
        out.update({f"recall_{_fmt(t)}px": v for t, v in zip(px_thr, recalls(e2, px_thr))})
        bt = float(proto.get("binned_threshold", 0.02))
        per_pair = torch.tensor([100.0 * (r["err3d"] < bt).float().mean().item() for r in used])
        out.update(
            rotation_binned(
                per_pair,
                torch.tensor([r["angle"] for r in used]),
                proto.get("rotation_bins", [0, 30, 60, 90, 120]),
                f"recall_{_fmt(bt * 100)}cm",
            )
        )
        out["pairs"] = float(len(used))
        _save_pairs(workdir, ids, results, bt, key="err3d")
        return out


# ----------------------------------------------------------------------------------- SPair-71k
def square_resize(image: Tensor, size: int) -> Tuple[Tensor, float]:
    """Pad ``[3,H,W]`` bottom/right with white to a square, resize to ``size``; returns the image and
    the scale (new pixels per original pixel)."""
    H, W = image.shape[-2:]
    S = max(H, W)
    img = F.pad(image, (0, S - W, 0, S - H), value=1.0)
    img = F.interpolate(img[None], size=(size, size), mode="bicubic", align_corners=False, antialias=size < S)[0].clamp(
        0, 1
    )
    return img, size / S


def transfer_keypoints(backbone, sample: Mapping[str, Any], proto: Mapping[str, Any]) -> Tensor:
    """Predicted target positions ``[N,2]`` (original target pixels) of the source keypoints."""
    dev = module_device(backbone)
    size = int(proto.get("image_size", 800))
    src, s_src = square_resize(sample["image_src"].to(dev).float(), size)
    trg, s_trg = square_resize(sample["image_trg"].to(dev).float(), size)
    with torch.no_grad():
        feats = _features(backbone, torch.stack([src, trg]), proto).float()
    feats = F.normalize(feats, dim=1)
    extent = feature_extent(backbone, size, size, proto.get("pad"))
    kp = (sample["kps_src"].to(dev).float() + 0.5) * s_src  # pixel index -> centre, resized
    if kp.shape[0] == 0:
        return torch.zeros(0, 2)
    f_src = F.normalize(sample_features(feats[0], kp, extent), dim=-1)  # [N,C]
    C, h, w = feats.shape[1:]
    best = (f_src @ feats[1].reshape(C, -1)).argmax(dim=1)
    row, col = best // w, best % w
    u = (col.float() + 0.5) * extent[1] / w
    v = (row.float() + 0.5) * extent[0] / h
    return (torch.stack([u, v], -1) / s_trg - 0.5).cpu()


def probe3d_square(image: Tensor, size: int) -> Tuple[Tensor, int]:
    """Probe3D's SPair image (``evals/datasets/spair.py``, use_bbox=False): the uint8 image padded
    bottom/right with 255 to a square of side ``S``, then PIL bicubic resize to ``size`` x ``size``
    (torchvision ``Resize`` on a PIL image). Returns the [3,size,size] image in [0,1] and ``S``."""
    import numpy as np
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    H, W = arr.shape[:2]
    S = max(H, W)
    canvas = np.full((S, S, 3), 255, np.uint8)
    canvas[:H, :W] = arr
    img = Image.fromarray(canvas).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0, S


def keypoint_hits_probe3d(backbone, sample: Mapping[str, Any], proto: Mapping[str, Any]) -> Tensor:
    """Probe3D's exact SPair keypoint test (``evaluate_spair_correspondence.py`` ``compute_errors``):
    keypoints truncated to integers of the ``size`` image (``kps * size / S`` into an int tensor), source
    features sampled with ``grid_sample(align_corners=True)`` at ``2 * kp / size - 1`` of the feature map of
    the centre-padded canvas, the prediction = the arg-max patch's *corner* ``(col, row) / w`` in [0, 1),
    error ``|pred - kp_trg / size|`` divided by ``max(bbox side) / max(image side)``, hit when < ``alpha``."""
    dev = module_device(backbone)
    size = int(proto.get("image_size", 800))
    src, S_src = probe3d_square(sample["image_src"], size)
    trg, S_trg = probe3d_square(sample["image_trg"], size)
    kp_s = torch.trunc(sample["kps_src"].long().float() * size / S_src)
    kp_t = torch.trunc(sample["kps_trg"].long().float() * size / S_trg)
    if kp_s.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    with torch.no_grad():
        feats = _features(backbone, torch.stack([src, trg]).to(dev), proto).float()
    feats = F.normalize(feats, p=2, dim=1)
    ndc = (kp_s / size * 2 - 1).to(dev)
    f_src = F.grid_sample(feats[:1], ndc[None, None], mode="bilinear", align_corners=True)[0, :, 0].T  # [N,C]
    C, h, w = feats.shape[1:]
    best = (f_src @ feats[1].reshape(C, -1)).argmax(dim=1).cpu()
    pred = torch.stack([best % w, best // w], -1).float() / w
    l, t, r, b = [float(v) for v in sample["bbox_trg"]]
    thresh_scale = max(r - l, b - t) / float(max(sample["image_trg"].shape[-2:]))
    err = (pred - kp_t / size).norm(dim=-1) / thresh_scale
    return err < float(proto.get("alpha", 0.1))


@TASKS.register(
    "spair_corr", "SPair-71k keypoint transfer by feature arg-max, PCK@0.1 (Probe3D exact mode; centre mode)"
)
class SPairCorrespondence(_RealDatasetTask):
    def evaluate(self, backbone, cfg, workdir: Path) -> Dict[str, float]:
        proto = to_container(cfg.task.protocol)
        alpha = float(proto.get("alpha", 0.1))
        mode = str(proto.get("mode", "probe3d"))
        if mode not in ("probe3d", "centre"):
            raise BenchError(
                f"task.protocol.mode={mode!r} is not an SPair mode",
                "use mode=probe3d (Probe3D's exact rule) or mode=centre (patch centres, bench's own)",
            )
        ds = _open_test(cfg)
        hits: Dict[Tuple[str, Any], List[Tensor]] = {}
        for i in _progress(range(len(ds)), len(ds), "spair pairs"):
            s = ds[i]
            if mode == "probe3d":
                if "bucket" not in s:
                    raise BenchError(
                        "mode=probe3d needs Probe3D's per-bucket samples",
                        "set task.dataset.kwargs.sampling=per_bucket (or task.protocol.mode=centre)",
                    )
                hit = keypoint_hits_probe3d(backbone, s, proto)
            else:
                pred = transfer_keypoints(backbone, s, proto)
                hit = pck_hits(pred, s["kps_trg"].float(), s["bbox_trg"].float(), alpha)
            # a per-bucket sample counts in its own bucket only; otherwise a pair counts in its viewpoint
            # bucket and in "all"
            tags = [s["bucket"]] if "bucket" in s else [int(s["viewpoint_variation"]), "all"]
            for tag in tags:
                hits.setdefault((s["category"], tag), []).append(hit)
        if not hits:
            raise BenchError("the SPair-71k split selected no pairs", "check task.dataset.kwargs (categories)")
        name = f"pck_{_fmt(alpha)}"
        cats = sorted({c for c, _ in hits})

        def pck(keys) -> Optional[float]:  # recall pooled over the keypoints of one sample (Probe3D)
            h = [x for k in keys for x in hits.get(k, [])]
            h = torch.cat(h) if h else torch.zeros(0, dtype=torch.bool)
            return 100.0 * h.float().mean().item() if h.numel() else None

        per_cat = {c: pck([(c, "all")]) for c in cats}
        per_cat = {c: v for c, v in per_cat.items() if v is not None}
        out = {name: sum(per_cat.values()) / len(per_cat)}
        for vp in (0, 1, 2):
            vals = [v for v in (pck([(c, vp)]) for c in cats) if v is not None]
            if vals:
                out[f"{name}_vp{vp}"] = sum(vals) / len(vals)
        out.update({f"{name}_{c}": v for c, v in per_cat.items()})
        out["pairs"] = float(sum(len(v) for k, v in hits.items() if k[1] == "all"))
        return out
