"""Issue 26 items 1-5: one code version per protocol, the anchors' training order, zero-normal pixels, the
small rules (padding, empty depth images, float warm-up, out-of-range seg ids, the depth clamp), and no
silent defaults for the anchors' numbers (docs/PROTOCOLS.md)."""

from __future__ import annotations

import math

import pytest
import torch

from bench import schema
from bench.config import compose
from bench.errors import BenchError
from helpers import resolved_protocol as _proto
from tasks.metrics import SegMeter, depth_metrics, normals_metrics, normals_valid, probe3d_depth_metrics
from tasks.protocol_record import protocol_summary
from tasks.train_probe import EpochBatches, lr_factor, warmup_steps


# -- item 1: code versions -------------------------------------------------------------------------------------------
def test_probe3d_code_versions_set_every_rule_together():
    paper = _proto("task=nyu_depth", "protocol=probe3d")
    assert paper["code_version"] == "probe3d_1fff822"
    assert (paper["head"]["upsample_mode"], paper["head"]["align_corners"]) == ("nearest", False)
    assert paper["head"]["resize"] == {"mode": "bilinear", "align_corners": False}
    assert paper["loss"]["grad_slices"] == "leading"  # 1fff822: slices on the batch / channel axes
    head = _proto("task=nyu_depth", "protocol=probe3d", "task.protocols.probe3d.code_version=probe3d_a1f1464")
    assert (head["head"]["upsample_mode"], head["head"]["align_corners"]) == ("bilinear", True)
    assert head["head"]["resize"]["align_corners"] is True and head["loss"]["grad_slices"] == "image"
    normals = _proto("task=nyu_normals")
    assert normals["code_version"] == "snd_evaluation2"
    assert normals["head"]["align_corners"] is False and normals["head"]["resize"]["align_corners"] is True


def test_a_rule_set_beside_its_code_version_is_an_error():
    with pytest.raises(BenchError, match="fixed by task.protocols.probe3d.code_version=probe3d_1fff822"):
        _proto("task=nyu_depth", "protocol=probe3d", "+task.protocols.probe3d.head.upsample_mode=bilinear")
    with pytest.raises(BenchError, match="probe3d_a1f1464"):
        _proto("task=nyu_depth", "protocol=probe3d", "task.protocols.probe3d.code_version=fbe0cd2")


def test_records_and_reference_rows_name_the_code_version():
    assert protocol_summary(compose(["task=nyu_depth", "protocol=probe3d"]))["code_version"] == "probe3d_1fff822"
    assert protocol_summary(compose(["task=nyu_depth"]))["code_version"] == "fit3d_evaluation"
    snd = compose(["task=nyu_depth", "task.protocols.linear.schedule_variant=snd_1gpu"])
    assert protocol_summary(snd)["code_version"] == "fit3d_evaluation+snd_1gpu"
    import pandas as pd
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "results" / "reference"
    ref = pd.concat(pd.read_csv(p) for p in sorted(root.glob("*.csv")))
    assert ref["code_version"].notna().all()
    assert set(ref[ref.source.str.startswith("FiT3D")].code_version) == {"fit3d_evaluation"}
    snd = ref[ref.source.str.startswith("SnD")]
    assert set(snd[snd.task == "nyu_normals"].code_version) == {"snd_evaluation2"}  # evaluation2: linear normals
    assert set(snd[snd.task != "nyu_normals"].code_version) == {"fit3d_evaluation+snd_1gpu"}  # evaluation1


def test_leaderboard_shows_a_reference_row_only_beside_records_of_its_code_version():
    import pandas as pd

    from bench.table import task_table

    ours = pd.DataFrame(
        [
            dict(
                method="dinov2",
                backbone="b",
                task="t",
                protocol="linear",
                code_version="fit3d_evaluation",
                seed=0,
                metric="rmse",
                value=1.0,
                reported=True,
                rank=0,
                wall_s=1.0,
                row="r",
                recipe="x",
                evaluation="e",
                cell="c",
                id="r0",
            )
        ]
    )
    ref = pd.DataFrame(
        [
            dict(
                source="A",
                method="dinov2",
                backbone="b",
                task="t",
                metric="rmse",
                value=0.5,
                note="",
                code_version="fit3d_evaluation",
            ),
            dict(
                source="B",
                method="dinov2",
                backbone="b",
                task="t",
                metric="rmse",
                value=0.7,
                note="",
                code_version="fit3d_evaluation+snd_1gpu",
            ),
        ]
    )
    table = task_table(ours, ref, "t", "linear")
    assert "A [code: fit3d_evaluation]" in table and "0.5" in table
    assert "B [code" not in table and "0.7" not in table
    assert "B [code: fit3d_evaluation+snd_1gpu]" in task_table(ours.iloc[:0], ref, "t", "-")  # no records: all


# -- item 2: training order ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task,protocol", [("nyu_depth", "probe3d"), ("nyu_normals", "probe3d"), ("nyu_normals", "linear")]
)
def test_probe3d_and_snd_evaluation2_never_shuffle(task, protocol):
    sched = _proto(f"task={task}", f"protocol={protocol}")["schedule"]
    assert sched["shuffle"] is False
    batches = EpochBatches(list(range(20)), sched["batch_size"], seed=3, shuffle=sched["shuffle"])
    assert batches.next().tolist() == list(range(8))  # Probe3D's first batch: items 0..7 of the sorted trainval list
    assert batches.next().tolist() == list(range(8, 16))
    batches.next()
    assert batches.next().tolist() == list(range(8))  # the next epoch starts over in the same order


def test_linear_depth_and_seg_keep_mmseg_shuffling():
    assert _proto("task=nyu_depth")["schedule"]["shuffle"] is True
    assert _proto("task=nyu_seg")["schedule"]["shuffle"] is True


# -- item 3: zero ground-truth normals inside the depth mask ------------------------------------------------------------
def test_a_zero_normal_pixel_with_valid_depth_counts_as_90_degrees():
    gt = torch.zeros(1, 3, 1, 2)
    gt[0, 2, 0, 0] = 1.0  # pixel 0: +z; pixel 1: zero normal, valid depth
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, 2] = 1.0  # a perfect prediction where the ground truth exists
    depth = torch.ones(1, 1, 2)
    valid = normals_valid(gt, depth, max_depth=10.0)
    assert valid.tolist() == [[[True, True]]]
    m = normals_metrics(pred, gt, valid)
    assert float(m["mean"][0]) == pytest.approx(45.0)  # (0 + 90) / 2
    assert float(m["rmse"][0]) == pytest.approx(math.sqrt(90.0**2 / 2))
    assert float(m["a11"][0]) == pytest.approx(50.0)
    from tasks.losses import angular_loss

    assert float(angular_loss(pred, gt, valid)) == pytest.approx((math.acos(1 - 1e-4) + math.pi / 2) / 2, rel=1e-6)
    # without the depth mask (the opt-in deviation depth_mask) the zero normal is not a label
    assert normals_valid(gt).tolist() == [[[True, False]]]


# -- item 4: the small rules -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw,out", [((448, 640), (462, 644)), ((476, 480), (490, 490)), ((448, 448), (448, 448))])
def test_correspondence_padding_is_probe3d_center_padding(hw, out):
    from tasks.matching import center_pad_offsets

    left, right, top, bottom = center_pad_offsets(*hw, 14)
    assert (hw[0] + top + bottom, hw[1] + left + right) == out
    if hw == (448, 640):
        assert (top, bottom, left, right) == (7, 7, 2, 2)


def test_probe3d_depth_metrics_average_an_empty_image_as_zeros():
    gt = torch.stack([torch.full((2, 2), 2.0), torch.zeros(2, 2)])
    pred = torch.full((2, 2, 2), 2.0)
    p3 = probe3d_depth_metrics(pred, gt)
    assert p3["d1"].tolist() == [1.0, 0.0] and p3["rmse"].tolist() == [0.0, 0.0]
    assert depth_metrics(pred, gt, empty_as_zero=True)["a1"].tolist() == [1.0, 0.0]
    assert depth_metrics(pred, gt)["a1"].tolist() == [1.0]  # the depth toolbox: NaN, skipped by nanmean


def test_probe3d_warmup_is_a_float_compared_with_le():
    # 5 steps per epoch, warm-up 1.5 epochs = 7.5 steps: step 7 is still warm-up (7 <= 7.5), step 8 decays
    sched = {"warmup": 1.5}
    w = warmup_steps(sched, 5)
    assert w == 7.5
    kw = dict(total=50, warmup=w, decay="quarter_cosine", warmup_start=0.01, min_factor=0.01, shape="sequential")
    assert lr_factor(7, **kw) == pytest.approx(0.99 * 7 / 7.5 + 0.01)
    assert lr_factor(8, **kw) == pytest.approx(0.99 * math.cos(0.5 * math.pi * 0.5 / 42.5) + 0.01)
    # an integral warm-up: the step that ends it has factor 1 either way
    assert lr_factor(10, **dict(kw, warmup=10.0)) == pytest.approx(1.0)


def test_seg_ids_beyond_the_classes_join_the_predicted_class_union():
    # mmseg intersect_and_union: only ignore_index (255) is dropped; gt id 5 of 3 classes is out of histc's
    # range for the label, but its prediction (class 1) still counts in class 1's union
    pred = torch.tensor([[0, 1, 1]])
    gt = torch.tensor([[0, 1, 5]])
    m = SegMeter(3)
    m.update(pred, gt)
    assert m.inter.tolist() == [1.0, 1.0, 0.0]
    assert m.union.tolist() == [1.0, 2.0, 0.0]
    assert m.result()["mIoU"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    m255 = SegMeter(3)
    m255.update(pred, torch.tensor([[0, 1, 255]]))
    assert m255.union.tolist() == [1.0, 1.0, 0.0]


def test_the_depth_clamp_only_where_the_anchor_has_it():
    assert _proto("task=nyu_depth")["test"]["clamp"] is True  # FiT3D encode_decode: clamp to the head's range
    assert _proto("task=nyu_depth", "protocol=probe3d")["test"]["clamp"] is False  # Probe3D: none
    # no 1 mm floor inside the metrics any more: a 0.5 mm prediction of 1 mm depth is a ratio of 2
    gt, pred = torch.full((1, 1, 1), 1e-3), torch.full((1, 1, 1), 5e-4)
    assert float(depth_metrics(pred, gt)["abs_rel"][0]) == pytest.approx(0.5)


# -- item 5: no silent defaults --------------------------------------------------------------------------------------
def test_a_deleted_lr_is_an_error_naming_it():
    cfg = compose(["task=nyu_depth", "~task.protocols.linear.schedule.lr"])
    with pytest.raises(BenchError, match=r"'task.protocols.linear.schedule.lr' is missing"):
        schema.check(cfg)
    cfg = compose(["task=nyu_normals", "~task.protocols.linear.schedule.shuffle"])
    with pytest.raises(BenchError, match=r"schedule.shuffle' is missing"):
        schema.check(cfg)


def test_train_probe_has_no_default_lr():
    from tasks.train_probe import train_probe

    sched = {"epochs": 1, "batch_size": 1, "weight_decay": 0.0, "betas": [0.9, 0.999], "decay": "constant"}
    with pytest.raises(BenchError, match="schedule.lr' is missing"):
        train_probe(torch.nn.Linear(1, 1), [torch.ones(1)], lambda b: b.sum(), sched, progress=False)


@pytest.mark.parametrize(
    "override,key,near",
    [("+devcie=cpu", "devcie", "device"), ("+task.dataset.limt=3", "task.dataset.limt", "task.dataset.limit")],
)
def test_misspelt_top_level_and_dataset_keys_are_errors(override, key, near):
    cfg = compose(["task=synth_depth", override])
    with pytest.raises(BenchError, match=rf"'{key}' does not exist.*did you mean {near}"):
        schema.check(cfg)


def test_a_key_a_recipe_interpolates_is_accepted():
    schema.check(compose(["experiment=dose_response", "task=synth_depth"]))  # its own top-level train_steps
