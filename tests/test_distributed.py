"""Data-parallel training on CPU (gloo, torchrun): 2 ranks x batch 1 == 1 process x batch 2, exact resume of a
2-rank run, rank 0 alone writes; plus the pieces (gradient all-reduce, pooled-mean weighting, step loader)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench.config import compose
from bench.loader import StepLoader
from helpers import mef_tiny, snd_tiny
from loopback import free_port, tagged, torchrun
from methods.splat_distill.official import CPU_DEVIATIONS
from methods.splat_distill.views import ViewSampler

ROOT = Path(__file__).resolve().parents[1]
#: float tolerance of "same weights": per-example gradients summed in another order (ranks vs one batch)
ATOL = 1e-5


def _overrides(root, steps=4):
    return [
        *snd_tiny(root, prototypes=64, hidden=64, bottleneck=16),
        f"method.optim.steps={steps}",
        "method.ckpt_every=2",
        "method.log_every=2",
        "method.lift.slic_segments=16",
        "method.adapter.dropout=0.0",  # stochastic layers draw per-rank streams: equality needs none
        "loader.workers=0",
        *CPU_DEVIATIONS,
    ]


def _torchrun(jobs, nproc=2):
    """``jobs`` [(workdir, out, stop_after, overrides)] in one launch (tests/dist_snd.py), loopback only, one
    output file per rank (tests/loopback.py); the ranks > 0's WRITES lists."""
    spec = [{"workdir": str(w), "out": str(o), "stop_after": s, "overrides": list(ov)} for w, o, s, ov in jobs]
    path = Path(jobs[0][0]).parent / f"jobs_{Path(jobs[0][1]).stem}.json"
    path.write_text(json.dumps(spec))
    logs = torchrun([str(ROOT / "tests" / "dist_snd.py"), str(path)], nproc)
    writes = [json.loads(x) for r in range(1, nproc) for x in tagged(logs[r], "WRITES")]
    assert len(writes) == nproc - 1 and not tagged(logs[0], "WRITES"), logs
    return writes


def _single(workdir, overrides, stop_after=None):
    from bench.backbones import build_backbone
    from bench.seed import seed_everything
    from methods.splat_distill import SplatDistill

    cfg = compose(overrides)
    seed_everything(0)
    return SplatDistill().fit(build_backbone(cfg.backbone), cfg, workdir, stop_after=stop_after).model.state_dict()


def _worker_pieces(rank, world, port, out):
    """One spawned rank of the tests of the pieces below: joins the process group (loopback) once and runs each
    piece's rank body, which saves its results to ``{out}_{piece}.{rank}``."""
    import torch.distributed as dist

    from bench import distributed as bd

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own sockets on loopback
    bd.init("cpu")
    for name, body in PIECES.items():
        body(rank, world, f"{out}_{name}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    """``{piece: (rank 0's results, rank 1's)}`` of one 2-rank spawn (a free loopback port) that runs every
    piece's rank body (one start-up for the three tests)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("pieces") / "r"
    mp.spawn(_worker_pieces, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return {name: tuple(torch.load(f"{out}_{name}.{r}") for r in (0, 1)) for name in PIECES}


def _mef_overrides(tmp):
    return [*mef_tiny(tmp), "method.optim.steps=3", "method.optim.batch_size=2"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, snd_scenes):
    """The first 2-rank launch, shared by the Splat-and-Distill and MEF tests below (one start-up for three runs):
    SnD uninterrupted (``two``) and cut after its step-2 checkpoint (``cut``), MEF uninterrupted (``mef_two``);
    first, the 1-process MEF run that the MEF test compares with (it also writes the objects both read)."""
    from bench.backbones import build_backbone
    from bench.seed import seed_everything
    from methods.mef import MEF

    tmp = tmp_path_factory.mktemp("ranks")
    cfg = compose(_mef_overrides(tmp / "mef"))
    seed_everything(0)
    mef_init = {k: v.clone() for k, v in build_backbone(cfg.backbone).model.state_dict().items()}
    seed_everything(0)
    mef_one = MEF().fit(build_backbone(cfg.backbone), cfg, tmp / "mef" / "one").state_dict()
    ov = _overrides(snd_scenes)
    jobs = [
        (tmp / "snd" / "two", tmp / "snd" / "two.pt", 0, ov),
        (tmp / "snd" / "cut", tmp / "snd" / "cut_a.pt", 2, ov),
        (tmp / "mef" / "two", tmp / "mef" / "two.pt", 0, _mef_overrides(tmp / "mef")),
    ]
    (tmp / "snd").mkdir()
    writes = _torchrun(jobs)
    return {"tmp": tmp, "writes": writes, "mef_init": mef_init, "mef_one": mef_one}


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_exactly(launched, snd_scenes):
    tmp_path = launched["tmp"] / "snd"
    ov = _overrides(snd_scenes)
    one = _single(tmp_path / "one", [*ov, "loader.workers=1"])  # 1 process, global batch 2, a loader worker

    two = torch.load(tmp_path / "two.pt")
    assert launched["writes"] == [[]]  # rank 1 created, wrote, renamed or deleted nothing
    assert one.keys() == two.keys()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - v).abs().max()) for k, v in _initial(ov).items())
    assert diff < ATOL and moved > 10 * diff, (diff, moved)  # training moved the weights far more than that

    # interrupted after the step-2 checkpoint (in the launch above), resumed in a new launch: equal to the
    # uninterrupted 2-rank run
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["ckpt_00000002.pt"]
    assert _torchrun([(tmp_path / "cut", tmp_path / "cut.pt", 0, ov)]) == [[]]
    cut = torch.load(tmp_path / "cut.pt")
    assert all(torch.equal(cut[k], two[k]) for k in two)
    ha = [json.loads(x) for x in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hb] == [1, 2, 3, 4] and [h["loss"] for h in ha] == [h["loss"] for h in hb]
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in ha], rel=1e-4)  # the global batch's loss
    for key in ("kl", "coverage", "head_cos", "student_usage_entropy", "teacher_usage_entropy"):
        # so are the logged diagnostics (issue 26.8), not rank 0's; the prototype usage too (issue 30.3)
        assert [h[key] for h in h1] == pytest.approx([h[key] for h in ha], rel=1e-3), key
    for key in ("agreement", "student_argmax_entropy", "teacher_argmax_entropy"):  # argmax: a near-tie may flip
        assert [h[key] for h in h1] == pytest.approx([h[key] for h in ha], abs=0.05), key
    d1, d2 = (json.loads((tmp_path / d / "diagnostics.json").read_text()) for d in ("one", "two"))
    for key in ("kl_first", "kl_last", "head_cos_first", "head_cos_last", "loss_last"):
        assert d2[key] == pytest.approx(d1[key], rel=1e-3), key
    metrics = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4] and all(m["ranks"] == 2 and m["images_per_s"] > 0 for m in metrics)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "ckpt_00000004.pt", weights_only=True)
    assert "history" not in ckpt and len(ckpt["rng_ranks"]) == 2 and ckpt["fingerprint"]["world_size"] == 2


@pytest.mark.slow
def test_smaller_last_step_two_ranks_equal_one_process_and_resume(snd_scenes, tmp_path):
    """views.last_batch=smaller (official): 3 scenes per epoch, global batch 2 -> steps of 2, 1, 2, 1 examples. In
    the 1-example steps rank 1 holds nothing and still joins every collective (no deadlock); its zero loss and
    the pooled-mean weight give the one-process gradient of that one example, so the weights and the logged
    losses equal one process's. A one-process run cut mid-epoch (after step 1) resumes exactly. Empty micro-batches
    of gradient accumulation on one rank run the same collectives as the other rank's."""
    ov = [*_overrides(snd_scenes), "method.views.order=epoch", "method.views.last_batch=smaller"]
    # a global batch of 4 over 3 scenes: every step holds 3 examples, shares 2 and 1; with accumulate=2 rank 1's
    # first micro-batch is empty and joins the collectives of rank 0's first one
    ov4 = [*ov, "method.optim.batch_size=4"]
    jobs = [
        (tmp_path / "two", tmp_path / "two.pt", 0, ov),
        (tmp_path / "two4", tmp_path / "two4.pt", 0, [*ov4, "method.optim.accumulate=2"]),
    ]
    assert _torchrun(jobs) == [[]]
    one = _single(tmp_path / "one", ov)
    two = torch.load(tmp_path / "two.pt")
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - v).abs().max()) for k, v in _initial(ov).items())
    assert diff < ATOL and moved > 10 * diff, (diff, moved)
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = [json.loads(x) for x in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h2], rel=1e-4)
    assert [h["coverage"] for h in h1] == pytest.approx([h["coverage"] for h in h2], rel=1e-4)
    _single(tmp_path / "cut", ov, stop_after=1)
    cut = _single(tmp_path / "cut", ov)
    assert all(torch.equal(cut[k], one[k]) for k in one)
    one = _single(tmp_path / "one4", ov4)
    two = torch.load(tmp_path / "two4.pt")
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < ATOL


@pytest.mark.slow
def test_mef_two_ranks_equal_one_process(launched):
    """MEF data-parallel: 2 ranks x 1 object pair == 1 process x 2 pairs (the pooled-positives mean re-weighted
    per rank), rank 1 writes nothing."""
    tmp_path, init, one = launched["tmp"] / "mef", launched["mef_init"], launched["mef_one"]
    assert launched["writes"] == [[]]
    two = torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[f"inner.model.{k}"] - v).abs().max()) for k, v in init.items())
    assert diff < ATOL and moved > 10 * diff, (diff, moved)
    assert (tmp_path / "two" / "history.json").exists()  # rank 0 wrote the curve (rank 1 nothing: above)


def _initial(ov):
    from bench.backbones import build_backbone
    from bench.seed import seed_everything

    seed_everything(0)
    return build_backbone(compose(ov).backbone).model.state_dict()


# ------------------------------------------------------------------------------------------- the pieces
def test_example_draws_depend_only_on_seed_and_index():
    a, b = ViewSampler([20, 30], gap=8, seed=3), ViewSampler([20, 30], gap=8, seed=3)
    b.sample(), b.sample()  # a running stream does not shift the indexed draws
    assert [a.example(i) for i in range(10)] == [b.example(i) for i in reversed(range(10))][::-1]
    assert len({a.example(i) for i in range(50)}) > 10
    assert ViewSampler([20, 30], gap=8, seed=4).example(0) != a.example(0) or a.example(1) != ViewSampler(
        [20, 30], gap=8, seed=4
    ).example(1)


def test_step_loader_in_order_with_workers_and_restart():
    fn = lambda s: torch.full((2,), float(s * s))  # noqa: E731
    ld = StepLoader(fn, 8, workers=1, prefetch=2)
    assert [float(ld.get(s)[0]) for s in range(3)] == [0.0, 1.0, 4.0]
    assert float(ld.get(6)[0]) == 36.0 and float(ld.get(7)[0]) == 49.0  # a jump (resume) restarts at that step
    ld.close()
    state = torch.get_rng_state()
    ld0 = StepLoader(fn, 8, workers=1)
    ld0.get(0)
    assert torch.equal(torch.get_rng_state(), state)  # workers leave the global RNG (dropout...) untouched
    ld0.close()


def _rank_allreduce(rank, world, out):
    from bench import distributed as bd

    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # q.grad missing on every rank -> None (DDP)
    bd.allreduce_gradients([p, q])
    w = bd.global_mean_weight(torch.tensor(1.0 + 3 * rank))  # counts 1 and 4 -> 2*1/5, 2*4/5
    torch.save(
        {"p": p.grad, "q": q.grad, "w": w, "bs": bd.per_rank_batch(4), "slice": list(bd.rank_slice(4))}, f"{out}.{rank}"
    )


@pytest.mark.slow
def test_gradient_average_and_pooled_mean_weight(pieces):
    r0, r1 = pieces["allreduce"]
    for r in (r0, r1):
        assert torch.equal(r["p"], torch.tensor([1.5, 3.0, 4.5])) and r["q"] is None
        assert r["bs"] == 2
    assert r0["w"] == pytest.approx(2 / 5) and r1["w"] == pytest.approx(8 / 5)
    assert r0["slice"] == [0, 1] and r1["slice"] == [2, 3]


# ------------------------------------------------------------------ issue 26.8: many ranks, one truth
class _Net(torch.nn.Module):
    """``used`` sees every example, ``sometimes`` only examples flagged 1 (none of rank 0's), ``never`` none."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(2, 1)
        self.sometimes = torch.nn.Parameter(torch.ones(1))
        self.never = torch.nn.Linear(3, 3)

    def forward(self, x, flags):
        out = self.used(x)[:, 0]
        if bool(flags.any()):
            out = out + self.sometimes * flags
        return out


_X = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [-1.0, 1.5]])  # the global batch of every step
_FLAGS = torch.tensor([0.0, 0.0, 1.0, 1.0])


def _train_net(workdir, rank, world):
    from bench.distributed import allreduce_gradients  # noqa: F401  (the loop calls it)
    from bench.train import TrainLoop

    torch.manual_seed(0)
    net = _Net()
    if rank == 1:  # a rank that built other weights starts from rank 0's all the same
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)

    def step(_):
        return ((net(_X[mine], _FLAGS[mine]) - 1.0) ** 2).mean()

    TrainLoop(workdir, 3, opt, {"model": net}, progress=False, ckpt_every=10, tensorboard=False).run(step)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _rank_truth(rank, world, out):
    from bench import distributed as bd

    weights = _train_net(f"{out}_w{rank}", rank, world)
    # diagnostics: a rank's mean over n cells -> the pooled mean; sampled rows of the pooled batch
    kl = bd.weighted_means({"kl": ([0.2, 0.5][rank], [3.0, 1.0][rank]), "empty": (7.0, 0.0)})
    rows = torch.arange(10.0).reshape(5, 2)[[slice(0, 2), slice(2, 5)][rank]]
    torch.save(
        {"w": weights, "kl": kl, "rows": bd.pooled_rows(rows, 3), "all": bd.pooled_rows(rows, 9)}, f"{out}.{rank}"
    )


@pytest.mark.slow
def test_two_ranks_log_the_global_batch_and_leave_unused_parameters_alone(pieces, tmp_path):
    """2 ranks x 2 examples == 1 process x 4 examples with AdamW (weight decay): the parameter no rank uses keeps
    grad None and its initial weights bit for bit (as DDP leaves it), the one only rank 1 uses trains as in one
    process, rank 1's other start-up weights are replaced by rank 0's; diagnostics are the global batch's."""
    one = _train_net(tmp_path / "one", 0, 1)
    r0, r1 = pieces["truth"]
    torch.manual_seed(0)
    init = _Net().state_dict()
    for r in (r0, r1):
        for k in ("never.weight", "never.bias"):
            assert torch.equal(r["w"][k], one[k]) and torch.equal(one[k], init[k]), k  # no decay, bit for bit
        for k in ("used.weight", "used.bias", "sometimes"):
            assert torch.allclose(r["w"][k], one[k], atol=1e-6) and not torch.equal(one[k], init[k]), k
        assert r["kl"]["kl"] == pytest.approx((0.2 * 3 + 0.5 * 1) / 4)  # pooled over the 4 cells, not rank 0's 0.2
        assert r["kl"]["empty"] == 7.0
        pooled = torch.arange(10.0).reshape(5, 2)
        assert torch.equal(r["rows"], pooled[torch.linspace(0, 4, 3).long()])  # rows 0, 2, 4 of the pooled batch
        assert torch.equal(r["all"], pooled)
    assert all(torch.equal(r0["w"][k], r1["w"][k]) for k in one)  # the ranks agree exactly


def _rank_saved(rank, world, out):
    from bench import distributed as bd
    from bench.backbones import build_backbone, save_backbone
    from bench.checkpoint import weights_hash
    from bench.runner import _same_as_saved

    torch.manual_seed(rank)  # rank 1's copy differs from the one rank 0 saves
    cfg = {"name": "tiny_cnn", "weights": "none", "hub_repo": None, "layers": [-1], "resize": "resize"}
    bb = build_backbone({**cfg, "mean": [0.5] * 3, "std": [0.25] * 3})
    before = weights_hash(bb)
    path = Path(f"{out}_model.safetensors")
    if rank == 0:
        save_backbone(bb, path)
    bd.barrier()
    after = weights_hash(_same_as_saved(bb, object(), None, path.parent, path))
    torch.save({"before": before, "after": after}, f"{out}.{rank}")


#: the rank bodies one spawn runs (the ``pieces`` fixture)
PIECES = {"allreduce": _rank_allreduce, "truth": _rank_truth, "saved": _rank_saved}


@pytest.mark.slow
def test_ranks_evaluate_the_backbone_rank_0_saved(pieces):
    r0, r1 = pieces["saved"]
    assert r1["before"] != r0["before"]  # rank 1 trained (here: built) another backbone
    assert r0["after"] == r1["after"] == r0["before"]  # both evaluate the one rank 0 saved
