"""The depth panels of ``depth_normals.png`` carry one colour bar in metres (no backbone, no GPU)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench import figures  # noqa: E402


def _colour_bars(fig):
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def test_depth_panels_share_one_scale_with_a_colour_bar_in_metres():
    gt = torch.tensor([[0.0, 1.5], [2.0, 4.0]])  # 0 = invalid; largest valid depth 4 m
    fig, axes = plt.subplots(1, 3)
    bar = figures.depth_panels(fig, list(axes), gt, {"a": gt * 0.5, "b": gt + 1.0})
    try:
        (cax,) = _colour_bars(fig)
        assert cax is bar.ax and cax.get_ylabel() == "depth (m)"
        assert cax.get_ylim() == (0.0, 4.0)  # the bar spans 0 .. max valid depth
        for ax in axes:  # every panel is drawn on the bar's scale
            (im,) = ax.get_images()
            assert (im.norm.vmin, im.norm.vmax) == (0.0, 4.0) and im.get_cmap().name == figures.DEPTH_CMAP
        # rmse over the valid pixels only: sqrt((0.75^2 + 1^2 + 2^2) / 3) = 1.3617
        assert axes[1].get_title() == "a\n(this view: rmse 1.362 m)"
    finally:
        plt.close(fig)


def test_depth_normals_figure_has_the_colour_bar(tmp_path, monkeypatch):
    gt = torch.linspace(0.5, 3.0, 48).reshape(6, 8)
    sample = {"image": torch.rand(3, 6, 8), "depth": gt[None]}
    monkeypatch.setattr(figures, "_test_sample", lambda rec, view: sample)
    monkeypatch.setattr(figures, "probe_prediction", lambda rec, bb, img: gt * 1.1)
    saved = {}

    def keep(fig, path):
        saved["fig"], saved["path"] = fig, path
        return path

    monkeypatch.setattr(figures, "_save", keep)
    recs = {("dinov2", "synth_depth"): {}, ("splat_distill", "synth_depth"): {}}
    figures.figure_depth_normals(recs, {"dinov2": None, "splat_distill": None}, tmp_path, 0)
    fig = saved["fig"]
    try:
        (cax,) = _colour_bars(fig)
        assert cax.get_ylabel() == "depth (m)" and cax.get_ylim() == (0.0, 3.0)
        assert saved["path"].name == "depth_normals.png"
    finally:
        plt.close(fig)
