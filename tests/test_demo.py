"""The demo recipe runs end to end (shrunk), lands in the leaderboard, and a second task reuses the
trained backbone from the cache instead of training again."""

import json

import pytest

from bench.cli import main
from bench.config import compose
from bench.runner import run_cell
from bench.table import leaderboard_markdown


def _shrunk(tmp_path, task):
    return compose(
        [
            "experiment=demo",
            f"task={task}",
            f"paths.results_dir={tmp_path}/results",
            f"paths.output_dir={tmp_path}/outputs",
            f"paths.cache_dir={tmp_path}/cache",
            f"paths.data_dir={tmp_path}/data",
            # the demo, shrunk: 3 SnD steps on 2 tiny rooms, a 1-epoch probe on 3 tiny rooms
            "method.data.scenes=2",
            "method.data.views=6",
            "method.data.size=[48,64]",
            "method.views.gap=2",
            "method.optim.steps=3",
            "method.ckpt_every=2",
            "method.progress=false",
            "task.dataset.scenes=3",
            "task.dataset.views=3",
            "task.dataset.size=48",
            "task.dataset.held_out=1",
            "task.protocols.linear.schedule.epochs=1",
            "task.progress=false",
        ]
    )


@pytest.mark.slow
def test_demo_recipe_end_to_end_and_backbone_reuse(tmp_path, capsys):
    rec = run_cell(_shrunk(tmp_path, "synth_depth"))
    assert rec["method"] == "splat_distill" and rec["backbone"] == "efficientnet_lite0"
    assert rec["checkpoint"]["kind"] == "trained" and rec["checkpoint"]["reused"] is False
    assert 0 < rec["metrics"]["rmse"] < 10 and 0 <= rec["metrics"]["a1"] <= 1
    assert rec["protocol"]["name"] == "linear"
    assert {"reconstructor.name=depth", "lift.coverage=alpha"} <= {d["id"] for d in rec["method_deviations"]}
    saved = json.loads(open(rec["_path"]).read())
    assert saved["metrics"] == rec["metrics"] and saved["config"]["method"]["optim"]["steps"] == 3

    rec2 = run_cell(_shrunk(tmp_path, "synth_seg"))
    assert rec2["checkpoint"]["reused"] is True
    assert rec2["checkpoint"]["cache_key"] == rec["checkpoint"]["cache_key"]

    assert main(["table", "--results", str(tmp_path / "results")]) == 0
    md = leaderboard_markdown(tmp_path / "results")
    assert "## synth_depth" in md and "## synth_seg" in md and "splat_distill" in md
