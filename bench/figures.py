"""Figures of the mini-benchmark from its committed records: ``python -m bench figures``.

Reads the records in ``results/runs/`` (one seed, default 0), rebuilds each method's backbone from the
record (raw teacher: the configured weights; trained methods: the cached ``model.safetensors`` the
record points to) and writes PNGs (matplotlib, Agg) to ``results/figures/``:

* ``features_pca.png`` -- one held-out view of the depth task and, per method, the first three
  principal components of its dense features (PCA fitted per method on that view) as RGB;
* ``depth_normals.png`` -- ground-truth depth and normals of that view beside each method's probe
  predictions (the probes the records' runs saved in ``<run_dir>/task/probe.safetensors``); the depth
  row shares one colour scale, shown by a colour bar in metres;
* ``correspondence.png`` -- one held-out pair of the correspondence task: the task's own matching
  (:func:`tasks.correspondence.depth_pair_errors` machinery: mutual 2-NN ratio top-k) drawn as lines,
  green within ``--px`` pixels of the exact ground truth, red otherwise;
* ``dose_response.png`` -- from the records alone (no backbones needed): per task, the first reported
  metric's difference to the raw teacher versus training steps for Splat-and-Distill and FiT3D, mean
  and 95% interval band over seeds (records of ``experiment=dose_response``), when a method has
  records at two or more step counts.

The figures need the trained backbones and probes, which live in the cache / run directories of the
machine that ran the grid. On another machine (e.g. a fresh clone with the committed records) run the
same grid into a new results directory first -- a sweep skips every cell that already has a record in
its results directory -- and draw from that one (:func:`grid_command` prints both commands)::

    python -m bench sweep experiment=mini_benchmark method=dinov2,fit3d,mef,splat_distill \
        task=synth_corr,synth_depth,synth_normals,synth_seg backbone=efficientnet_lite0 seed=0 cluster=local \
        paths.results_dir=results_local
    python -m bench figures --results results_local
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from .errors import BenchError

log = logging.getLogger("bench")

METHOD_ORDER = ("dinov2", "fit3d", "splat_distill")
LABELS = {"dinov2": "raw teacher", "fit3d": "FiT3D", "splat_distill": "Splat-and-Distill", "mef": "MEF"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", default=None, help="results dir (records in <results>/runs; default: $BENCH_RESULTS, else results)"
    )
    p.add_argument("--out", default=None, help="output dir (default <results>/figures)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the records to draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the records to draw")
    p.add_argument("--view", type=int, default=0, help="index of the held-out (test split) view")
    p.add_argument("--pair", type=int, default=0, help="index of the held-out correspondence pair")
    p.add_argument("--px", type=float, default=10.0, help="correct-match threshold (pixels) for the colours")
    p.add_argument("--lines", type=int, default=60, help="matches drawn per method")
    p.add_argument(
        "--only",
        choices=("all", "dose_response", "qualitative"),
        default="all",
        help="draw only the dose-response plot (records alone) or only the qualitative figures "
        "(PCA, depth/normals, matches: need the trained backbones and probes)",
    )


class NotOnThisMachine(BenchError):
    """A record's trained backbone or probe lives on the machine that ran its grid, not here."""


def grid_command(results: str | Path, recs: Mapping[tuple, Mapping[str, Any]], backbone: str, seed: int) -> str:
    """The commands that make a record set's backbones and probes on this machine: the same grid (the
    records' recipe, methods, tasks, backbone and seed) swept into a NEW results directory (a sweep skips
    every cell whose record already exists in its results directory, so into ``results`` it would run
    nothing), then the figures of that directory."""
    results = Path(results)
    has_records = (results / "runs").is_dir() and any((results / "runs").glob("*.json"))
    new = results.with_name(results.name + "_local") if has_records else results
    labels = sorted({str((r.get("identity") or {}).get("label") or "") for r in recs.values()} - {""})
    recipe = labels[0] if len(labels) == 1 and labels[0] in _experiments() else "mini_benchmark"
    methods = ",".join(sorted({m for m, _ in recs}) or METHOD_ORDER)
    tasks = ",".join(sorted({t for _, t in recs}) or ("synth_depth", "synth_normals", "synth_corr", "synth_seg"))
    return (
        f"python -m bench sweep experiment={recipe} method={methods} task={tasks} backbone={backbone} "
        f"seed={seed} cluster=local paths.results_dir={new}, then python -m bench figures --results {new}"
        + ("" if backbone == "efficientnet_lite0" else f" --backbone {backbone}")
        + ("" if seed == 0 else f" --seed {seed}")
    )


def _experiments() -> List[str]:
    from .config import group_options

    return list(group_options("experiment"))


# ---------------------------------------------------------------------------------------- helpers
def pca_rgb(feat: torch.Tensor) -> torch.Tensor:
    """``[C,h,w]`` -> ``[h,w,3]`` in [0,1]: projection on the first three principal components, each
    min-max normalised (robustly: 1st-99th percentile)."""
    C, h, w = feat.shape
    x = feat.reshape(C, -1).T.double()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    k = min(3, v.shape[0])
    y = x @ v[:k].T
    if k < 3:
        y = torch.cat([y, y.new_zeros(y.shape[0], 3 - k)], 1)
    lo, hi = torch.quantile(y, 0.01, dim=0), torch.quantile(y, 0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return y.reshape(h, w, 3).float()


def latest_records(results: Path, backbone: str, seed: int) -> Dict[tuple, Dict[str, Any]]:
    """``{(method, task): record}``, latest record per cell of ``backbone`` and ``seed``."""
    from .records import load_records

    out: Dict[tuple, Dict[str, Any]] = {}
    for rec in sorted(load_records(results), key=lambda r: r.get("created", "")):
        if rec.get("backbone") == backbone and int(rec.get("seed", 0)) == seed:
            out[(rec["method"], rec["task"])] = rec
    return out


def backbone_of(rec: Mapping[str, Any]):
    """The backbone the record evaluated: built from its config, trained weights loaded from its
    checkpoint reference (the runner's cache)."""
    from .backbones import build_backbone, load_backbone_weights

    cfg = OmegaConf.create(rec["config"])
    bb = build_backbone(cfg.backbone)
    ck = rec.get("checkpoint") or {}
    if ck.get("kind") == "trained":
        path = Path(str(ck.get("path", "")))
        if not path.is_file():
            raise NotOnThisMachine(
                f"the trained backbone of record {rec['id']} is not on this machine ({path})",
                "run the grid first (python -m bench sweep experiment=mini_benchmark ...), which trains and caches it",
            )
        load_backbone_weights(bb, path)
        from .registry import METHODS

        method = METHODS.get(str(rec["method"]))()
        if hasattr(method, "restore"):  # e.g. MEF: the feature head saved beside the weights
            bb = method.restore(bb, cfg, path.parent)
    return bb.eval()


def _methods(recs: Mapping[tuple, Any], task: str) -> List[str]:
    return [m for m in METHOD_ORDER if (m, task) in recs] + sorted(
        {m for (m, t) in recs if t == task and m not in METHOD_ORDER}
    )


def _test_sample(rec: Mapping[str, Any], view: int) -> Dict[str, Any]:
    from tasks.data import open_split
    from tasks.transforms import Transformed
    from tasks.dense import resolve_protocol

    cfg = OmegaConf.create(rec["config"])
    proto = resolve_protocol(cfg)
    kind_key = {"synth_depth": "depth", "synth_normals": "normals"}.get(rec["task"], "depth")
    ds = Transformed(open_split(cfg.task.dataset, "test"), proto.get("test", {}) or {}, False, ("image", kind_key))
    return ds[view % len(ds)]


@torch.no_grad()
def probe_prediction(rec: Mapping[str, Any], backbone, image: torch.Tensor) -> torch.Tensor:
    """The record's saved probe applied to ``image [3,H,W]``: depth ``[H,W]`` or normals ``[3,H,W]``."""
    from bench.registry import TASKS
    from bench.checkpoint import read_state_dict
    from tasks.dense import resolve_protocol
    from tasks.features import FeatureSpec, features
    from tasks.probes import DenseProbe

    cfg = OmegaConf.create(rec["config"])
    task_obj = TASKS.get(rec["task"])()
    proto = resolve_protocol(cfg)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    path = Path(str(rec.get("run_dir", ""))) / "task" / "probe.safetensors"
    if not path.is_file():
        raise NotOnThisMachine(
            f"the probe of record {rec['id']} is not on this machine ({path})",
            "run the grid first (python -m bench sweep experiment=mini_benchmark ...)",
        )
    spec = FeatureSpec.from_config(proto.get("features", {}), backbone)
    feats = features(backbone, image[None], spec)
    probe = DenseProbe(
        task_obj.kind, proto.get("head", {}), [f.shape[1] for f in feats], **task_obj.probe_kwargs(task, proto)
    )
    probe.load_state_dict(read_state_dict(path), strict=True)
    out = probe.eval()(feats, tuple(image.shape[-2:]))
    if task_obj.kind == "depth":
        d = out["depth"][0]
        return d[0] if d.dim() == 3 else d
    return F.normalize(out["normals"][0], dim=0)


def normals_rgb(n: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Camera-frame unit normals ``[3,H,W]`` -> RGB ``[H,W,3]`` ((n + 1) / 2), invalid pixels white."""
    rgb = ((n + 1) / 2).clamp(0, 1).permute(1, 2, 0)
    if valid is not None:
        rgb = torch.where(valid[..., None], rgb, torch.ones_like(rgb))
    return rgb


# ---------------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    log.info("wrote %s (%d KB)", path, path.stat().st_size // 1024)
    return path


def figure_pca(recs, backbones, out: Path, view: int) -> Optional[Path]:
    import matplotlib.pyplot as plt

    task = "synth_depth" if any(t == "synth_depth" for _, t in recs) else sorted({t for _, t in recs})[0]
    methods = [m for m in _methods(recs, task) if m in backbones]
    if not methods:
        return None
    image = _test_sample(recs[(methods[0], task)], view)["image"]
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(2.6 * (len(methods) + 1), 2.9))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title(f"held-out view ({task} test #{view})", fontsize=8)
    for ax, m in zip(axes[1:], methods):
        with torch.no_grad():
            f = backbones[m](image[None])[0].float()
        ax.imshow(pca_rgb(f).numpy(), interpolation="nearest")
        ax.set_title(f"{LABELS.get(m, m)}: PCA of features\n[{f.shape[0]}x{f.shape[1]}x{f.shape[2]}]", fontsize=8)
    for ax in axes:
        ax.axis("off")
    return _save(fig, out / "features_pca.png")


#: colour map of the depth panels (near = dark) and the label of their colour bar
DEPTH_CMAP, DEPTH_LABEL = "magma_r", "depth (m)"


def depth_panels(fig, axes: Sequence[Any], gt: torch.Tensor, preds: Mapping[str, torch.Tensor]):
    """Ground-truth depth ``gt [H,W]`` (metres, 0 = invalid) in ``axes[0]`` and each prediction of
    ``preds`` (label -> ``[H,W]`` metres) in the next axes, on one colour scale from 0 to the largest
    valid ground-truth depth, with one colour bar in metres beside the row; returns the colour bar."""
    valid = gt > 0
    vmax = float(gt[valid].max()) if valid.any() else 1.0
    im = axes[0].imshow(gt.numpy(), cmap=DEPTH_CMAP, vmin=0, vmax=vmax)
    axes[0].set_title("depth: ground truth", fontsize=8)
    for ax, (label, pred) in zip(axes[1:], preds.items()):
        rmse = float(((pred - gt)[valid] ** 2).mean().sqrt()) if valid.any() else float("nan")
        ax.imshow(pred.numpy(), cmap=DEPTH_CMAP, vmin=0, vmax=vmax)
        ax.set_title(f"{label}\n(this view: rmse {rmse:.3f} m)", fontsize=8)
    bar = fig.colorbar(im, ax=list(axes[: 1 + len(preds)]), fraction=0.025, pad=0.02)
    bar.set_label(DEPTH_LABEL, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def figure_depth_normals(recs, backbones, out: Path, view: int) -> Optional[Path]:
    import matplotlib.pyplot as plt

    rows = [t for t in ("synth_depth", "synth_normals") if any(tt == t for _, tt in recs)]
    if not rows:
        return None
    cols = max(len([m for m in _methods(recs, t) if m in backbones]) for t in rows) + 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.6 * len(rows)), squeeze=False)
    for r, task in enumerate(rows):
        methods = [m for m in _methods(recs, task) if m in backbones]
        s = _test_sample(recs[(methods[0], task)], view)
        img = s["image"]
        axes[r, 0].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r, 0].set_title("held-out view", fontsize=8)
        if task == "synth_depth":
            gt = s["depth"].float().squeeze()
            preds = {LABELS.get(m, m): probe_prediction(recs[(m, task)], backbones[m], img) for m in methods}
            depth_panels(fig, list(axes[r, 1 : len(methods) + 2]), gt, preds)
        else:
            gt = s["normals"].float()
            valid = gt.norm(dim=0) > 0.5
            axes[r, 1].imshow(normals_rgb(gt, valid).numpy())
            axes[r, 1].set_title("normals: ground truth", fontsize=8)
            for c, m in enumerate(methods):
                pred = probe_prediction(recs[(m, task)], backbones[m], img)
                cos = (pred * gt).sum(0).clamp(-1, 1)
                err = float(torch.rad2deg(torch.acos(cos[valid])).mean()) if valid.any() else float("nan")
                axes[r, c + 2].imshow(normals_rgb(pred, valid).numpy())
                axes[r, c + 2].set_title(f"{LABELS.get(m, m)}\n(this view: mean {err:.1f} deg)", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    return _save(fig, out / "depth_normals.png")


def _pair_matches(backbone, sample, proto, px: float):
    """Matches of one pair as the task computes them; returns (uv_a, uv_b) in the image's pixel units and
    whether each match is within ``px`` pixels of the ground truth in the task's error units (pixels of
    the ``depth_scale``-scaled image, like the task's recall_10px)."""
    from bench.cameras import dense_correspondence, pixel_grid, scale_intrinsics
    from tasks.matching import extract_features, feature_extent, match_ratio_topk, sample_features

    images, depth = sample["images"].float(), sample["depth"].float()
    H, W = images.shape[-2:]
    s = float(proto.get("depth_scale", 0.25))
    Hq, Wq = max(1, round(H * s)), max(1, round(W * s))
    dq = F.interpolate(depth[:, None], size=(Hq, Wq), mode="nearest")[:, 0]
    Kq = scale_intrinsics(sample["K"].float(), Wq / depth.shape[-1], Hq / depth.shape[-2])
    w2c = sample["w2c"].float()
    with torch.no_grad():
        feats = extract_features(backbone, images, proto.get("layers"), proto.get("input_norm")).float()
    extent = feature_extent(backbone, H, W)
    uv = pixel_grid(Hq, Wq)
    to_img = uv.new_tensor([W / Wq, H / Hq])
    uv_gt, qmask = dense_correspondence(
        dq[0], Kq[0], w2c[0], dq[1], Kq[1], w2c[1], rel_tol=float(proto.get("occlusion_tol", 0.01))
    )
    vb = dq[1] > 0
    fa = sample_features(feats[0], uv[qmask] * to_img, extent)
    fb = sample_features(feats[1], uv[vb] * to_img, extent)
    ia, ib, _ = match_ratio_topk(
        fa, fb, proto.get("num_corr", 1000), proto.get("max_ratio"), int(proto.get("chunk_elems", 1 << 24))
    )
    err = (uv_gt[qmask][ia] - uv[vb][ib]).norm(dim=-1)
    return uv[qmask][ia] * to_img, uv[vb][ib] * to_img, err <= px  # task units (x depth_scale image)


def figure_correspondence(recs, backbones, out: Path, pair: int, px: float, lines: int) -> Optional[Path]:
    import matplotlib.pyplot as plt
    from bench.data.scenes import MultiViewScenes
    from bench.data.synthetic import ensure_synthetic, split_scenes
    from tasks.correspondence import synthetic_pairs

    methods = [m for m in _methods(recs, "synth_corr") if m in backbones]
    if not methods:
        return None
    cfg = OmegaConf.create(recs[(methods[0], "synth_corr")]["config"])
    ds = OmegaConf.to_container(cfg.task.dataset, resolve=True)
    proto = OmegaConf.to_container(cfg.task.protocol, resolve=True)
    root = ensure_synthetic(
        ds["root"],
        scenes=int(ds.get("scenes", 8)),
        views=int(ds.get("views", 24)),
        size=list(ds.get("size", [224, 224])),
        seed=int(ds.get("seed", 0)),
    )
    scenes = MultiViewScenes(root)
    ids = split_scenes(scenes.scene_ids, ds.get("held_out", 0.25))[1] or scenes.scene_ids
    gaps = proto.get("view_gaps", [2, 4, 8])
    pairs = synthetic_pairs(scenes, ids, [gaps[len(gaps) // 2]], proto.get("pairs_per_gap"))
    sid, i, j, g = pairs[pair % len(pairs)]
    sample = scenes.load_views(sid, [i, j])
    a, b = (sample["images"][k].permute(1, 2, 0).clamp(0, 1) for k in (0, 1))
    H, W = a.shape[:2]
    fig, axes = plt.subplots(len(methods), 1, figsize=(6.4, 3.3 * len(methods)), squeeze=False)
    gen = torch.Generator().manual_seed(0)
    for ax, m in zip(axes[:, 0], methods):
        ua, ub, ok = _pair_matches(backbones[m], sample, proto, px)
        idx = torch.randperm(len(ok), generator=gen)[:lines]
        ax.imshow(torch.cat([a, b], 1).numpy())
        for k in idx.tolist():
            ax.plot(
                [float(ua[k, 0]), float(ub[k, 0]) + W],
                [float(ua[k, 1]), float(ub[k, 1])],
                color="limegreen" if bool(ok[k]) else "red",
                lw=0.7,
            )
        ax.set_title(
            f"{LABELS.get(m, m)}: {100 * float(ok.float().mean()):.1f}% of {len(ok)} matches within "
            f"{px:g} px ({sid}, views {i}-{j}, gap {g}; {len(idx)} drawn)",
            fontsize=8,
        )
        ax.axis("off")
    return _save(fig, out / "correspondence.png")


def make_figures(
    results: str | Path,
    out: str | Path | None = None,
    backbone: str = "efficientnet_lite0",
    seed: int = 0,
    view: int = 0,
    pair: int = 0,
    px: float = 10.0,
    lines: int = 60,
    only: str = "all",
) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    results = Path(results)
    out = Path(out) if out is not None else results / "figures"
    from .records import load_records

    dose = figure_dose_response(list(load_records(results)), out, backbone) if only != "qualitative" else None
    if only == "dose_response":
        if dose is None:
            raise BenchError(
                f"no dose-response in {results}/runs: no trained method has records at two or more "
                "training lengths (with raw-teacher records of the same tasks)",
                "run the recipe first: python -m bench sweep experiment=dose_response ... "
                "(bench/conf/experiment/dose_response.yaml)",
            )
        return [dose]
    recs = latest_records(results, backbone, seed)
    if not recs and dose is not None:
        return [dose]
    if not recs:
        raise BenchError(
            f"no records of backbone {backbone} seed {seed} in {results}/runs",
            f"run the grid first: {grid_command(results, {}, backbone, seed)}",
        )
    try:
        backbones: Dict[str, Any] = {}
        for m in sorted({m for m, _ in recs}):
            rec = next(r for (mm, _), r in sorted(recs.items()) if mm == m)
            backbones[m] = backbone_of(rec)
        paths = [
            figure_pca(recs, backbones, out, view),
            figure_depth_normals(recs, backbones, out, view),
            figure_correspondence(recs, backbones, out, pair, px, lines),
            dose,
        ]
    except NotOnThisMachine as e:  # the records came from another machine (e.g. the committed grid)
        raise BenchError(
            e.problem, f"make them here by running the same grid: {grid_command(results, recs, backbone, seed)}"
        ) from None
    return [p for p in paths if p is not None]


def main(args: argparse.Namespace) -> int:
    from .records import default_results_dir

    torch.set_num_threads(min(2, torch.get_num_threads()))
    for p in make_figures(
        args.results or default_results_dir(),
        args.out,
        args.backbone,
        args.seed,
        args.view,
        args.pair,
        args.px,
        args.lines,
        args.only,
    ):
        print(p)
    return 0


# ------------------------------------------------------------------------------- dose-response
DOSE_METHODS = ("splat_distill", "fit3d")


def training_steps(rec: Mapping[str, Any]) -> Optional[int]:
    """Optimiser steps of a trained record's method (SnD ``optim.steps``; FiT3D ``stage2.steps``, or
    ``epochs x ceil(scenes x views / batch)`` for a synthetic set), None when unknown."""
    m = (rec.get("config") or {}).get("method") or {}
    if rec.get("method") == "splat_distill":
        return int((m.get("optim") or {}).get("steps", 0)) or None
    if rec.get("method") == "fit3d":
        s2 = m.get("stage2") or {}
        if s2.get("steps"):
            return int(s2["steps"])
        d = m.get("data") or {}
        if isinstance(d.get("scenes"), int) and d.get("views"):
            import math

            return int(s2.get("epochs", 1)) * math.ceil(
                int(d["scenes"]) * int(d["views"]) / int(s2.get("batch_size", 2))
            )
    return None


def dose_response_table(records: Sequence[Mapping[str, Any]], backbone: Optional[str] = None):
    """``{task: {method: [(steps, mean delta, low, high, n), ...]}}``: each task's first reported
    metric minus the raw teacher's (paired by seed), mean and 95% t-interval over seeds per step count."""
    import pandas as pd

    from .table import TEACHER, delta_vs_teacher

    rows = []
    for rec in sorted(records, key=lambda r: r.get("created", "")):
        if backbone is not None and rec.get("backbone") != backbone:
            continue
        steps = 0 if rec["method"] == TEACHER else training_steps(rec)
        if steps is None or (rec["method"] != TEACHER and rec["method"] not in DOSE_METHODS):
            continue
        report = [m for m in (rec.get("report") or sorted(rec.get("metrics") or {})) if m in (rec.get("metrics") or {})]
        if not report:
            continue
        rows.append(
            {
                "method": rec["method"],
                "backbone": rec["backbone"],
                "task": rec["task"],
                "steps": steps,
                "seed": int(rec.get("seed", 0)),
                "metric": report[0],
                "value": float(rec["metrics"][report[0]]),
                "id": rec["id"],
            }
        )
    df = pd.DataFrame(rows)
    out: Dict[str, Dict[str, list]] = {}
    if df.empty:
        return out
    df = df.drop_duplicates(["method", "backbone", "task", "steps", "seed"], keep="last")
    for task, g in df.groupby("task"):
        teacher = g[g.method == TEACHER]
        if teacher.empty:
            continue
        for (method, bb, steps), h in g[g.method != TEACHER].groupby(["method", "backbone", "steps"]):
            sub = pd.concat([teacher[teacher.backbone == bb], h])
            d = delta_vs_teacher(sub, method, bb, h["metric"].iloc[0])
            if d is None:
                continue
            mean, hw, n = d
            hw = 0.0 if hw != hw else hw
            out.setdefault(task, {}).setdefault(method, []).append((int(steps), mean, mean - hw, mean + hw, n))
    for task in out:
        for method in out[task]:
            out[task][method].sort()
    return out


def figure_dose_response(
    records: Sequence[Mapping[str, Any]], out: Path, backbone: Optional[str] = None
) -> Optional[Path]:
    """``dose_response.png``: per task, metric difference to the raw teacher vs training steps (log
    axis), mean over seeds with a 95% interval band, one line per method. None when fewer than two
    step counts exist for any method."""
    table = dose_response_table(records, backbone)
    table = {t: ms for t, ms in table.items() if any(len(v) >= 2 for v in ms.values())}
    if not table:
        return None
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    metric_of = {}
    for rec in records:
        rep = list(rec.get("report") or sorted(rec["metrics"]))
        if rep:
            metric_of.setdefault(rec["task"], rep[0])
    tasks = sorted(table)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, pts in sorted(table[task].items()):
            x = [p[0] for p in pts]
            line = ax.plot(x, [p[1] for p in pts], marker="o", label=LABELS.get(method, method))[0]
            ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.2)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        steps = sorted({p[0] for pts in table[task].values() for p in pts})
        ax.set_xticks(steps, [str(x) for x in steps])  # the measured training lengths, not 10^k
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"{metric_of.get(task, '')} - teacher")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("dose-response: difference to the raw teacher (mean, 95% interval over seeds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "dose_response.png")
