"""Synthetic scenes: determinism, exact geometry, on-disk format, reader round trip, clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cameras import dense_correspondence, opencv_w2c_to_opengl_c2w, unproject_depth
from bench.data import synthetic as S
from bench.data.scenes import MultiViewScenes, ViewDataset
from bench.errors import BenchError, DataMissingError

SCENES, VIEWS, SIZE, SEED = 2, 4, (64, 64), 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return S.generate(tmp_path_factory.mktemp("synth") / "a", SCENES, VIEWS, SIZE, SEED)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_meta(root):
    meta = json.loads((root / "meta.json").read_text())
    assert (
        meta["generator"] == S.GENERATOR and meta["seed"] == SEED and meta["scene_ids"] == ["synth_0000", "synth_0001"]
    )
    sdir = root / "synth_0000"
    tf = json.loads((sdir / "dslr/nerfstudio/transforms_undistorted.json").read_text())
    assert tf["camera_model"] == "PINHOLE" and (tf["w"], tf["h"]) == (64, 64) and len(tf["frames"]) == VIEWS
    name = tf["frames"][0]["file_path"]
    stem = name.rsplit(".", 1)[0]
    assert Image.open(sdir / "dslr/undistorted_images" / name).mode == "RGB"
    assert np.asarray(Image.open(sdir / "dslr/render_depth" / f"{stem}.png")).dtype == np.uint16
    assert np.load(sdir / "dslr/render_normal_camera" / f"{stem}.npz")["normals"].shape == (64, 64, 3)
    assert np.asarray(Image.open(sdir / "dslr/render_semantic" / f"{stem}.png")).dtype == np.uint8
    assert np.asarray(Image.open(sdir / "dslr/render_instance" / f"{stem}.png")).dtype == np.uint16
    smeta = json.loads((sdir / "meta.json").read_text())
    assert smeta["classes"] == list(S.CLASSES) and smeta["seed"] == SEED and smeta["objects"]


@pytest.mark.slow
def test_deterministic_per_seed(root, tmp_path):
    again = S.generate(tmp_path / "b", SCENES, VIEWS, SIZE, SEED, workers=2)  # also: workers don't matter
    assert _files(again) == _files(root)
    other = S.generate(tmp_path / "c", 1, VIEWS, SIZE, SEED + 1)
    a, c = _files(root), _files(other)
    assert (
        a["synth_0000/dslr/undistorted_images/frame_0000.png"] != c["synth_0000/dslr/undistorted_images/frame_0000.png"]
    )
    assert a["synth_0000/meta.json"] != c["synth_0000/meta.json"]


@pytest.mark.slow
def test_workers_run_from_a_script_without_main_guard(root, tmp_path):
    """Worker processes are fresh interpreters: a plain script (no ``if __name__ == "__main__"``) that
    generates scenes with 2 workers runs once and writes the same files as the in-process path."""
    import subprocess
    import sys

    script = tmp_path / "plain.py"
    script.write_text(
        "from bench.data.synthetic import generate\n"
        f"generate({str(tmp_path / 'w')!r}, {SCENES}, {VIEWS}, {tuple(SIZE)!r}, {SEED}, workers=2)\n"
        "print('ran')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ran"]  # the script body ran exactly once
    assert _files(tmp_path / "w") == _files(root)


@pytest.mark.slow
def test_worker_failure_is_one_clear_error(tmp_path):
    (tmp_path / "synth_0001").write_text("a file where scene 1's folder must go")
    with pytest.raises(BenchError, match="worker process.*synth_0001") as e:
        S.generate(tmp_path, 2, 2, (16, 16), SEED, workers=2)
    assert "workers=1" in e.value.fix
    assert not (tmp_path / "meta.json").exists()  # no set marked complete


def test_reader_round_trip(root):
    ds = MultiViewScenes(root)
    assert ds.scene_ids == ["synth_0000", "synth_0001"] and ds.num_views("synth_0001") == VIEWS
    s = ds.load_views("synth_0001", [0, 2, 3])
    assert s["images"].shape == (3, 3, 64, 64) and s["images"].dtype == torch.float32
    assert 0 <= s["images"].min() and s["images"].max() <= 1
    assert s["depth"].shape == (3, 64, 64) and s["normals"].shape == (3, 3, 64, 64)
    assert s["semantic"].dtype == torch.int64 and s["instance"].dtype == torch.int64
    scene = S.make_scene(SEED, 1, VIEWS)
    w2c = S.camera_path(scene, VIEWS)[[0, 2, 3]]
    assert torch.allclose(s["w2c"].double(), w2c, atol=1e-6)
    assert torch.allclose(s["K"].double(), S.intrinsics(64, 64).expand(3, 3, 3), atol=1e-6)
    K, w = ds.cameras("synth_0001")
    assert K.shape == (VIEWS, 3, 3) and torch.allclose(w[[0, 2, 3]], s["w2c"])
    # the stored c2w is OpenGL: converting back gives the generator's pose
    tf = json.loads((root / "synth_0001/dslr/nerfstudio/transforms_undistorted.json").read_text())
    assert torch.allclose(
        torch.tensor(tf["frames"][2]["transform_matrix"], dtype=torch.float64),
        opencv_w2c_to_opengl_c2w(w2c[1]),
        atol=1e-12,
    )
    # labels are exactly what the renderer gives at pixel centres
    r = S.render_view(scene, S.intrinsics(64, 64), w2c[1], 64, 64)
    assert torch.equal(s["semantic"][1], r["semantic"]) and torch.equal(s["instance"][1], r["instance"])
    assert (s["depth"][1] - r["depth"]).abs().max() <= 0.0005 + 1e-6  # mm quantisation
    assert (s["normals"][1] - r["normals"].permute(2, 0, 1)).abs().max() < 1e-3
    assert set(s["semantic"].unique().tolist()) >= {0, 1}  # walls and floor in view


def test_resize_scales_intrinsics(root):
    ds = MultiViewScenes(root, size=(32, 48))
    s = ds.load_views("synth_0000", [1])
    assert s["images"].shape == (1, 3, 32, 48) and s["depth"].shape == (1, 32, 48)
    K = S.intrinsics(64, 64)
    assert torch.allclose(
        s["K"][0].double(),
        torch.tensor([[K[0, 0] * 0.75, 0, 24.0], [0, K[1, 1] * 0.5, 16.0], [0, 0, 1]], dtype=torch.float64),
        atol=1e-5,
    )
    assert torch.allclose(ds.cameras("synth_0000")[0][1], s["K"][0])


def test_multiview_geometry_consistent(root):
    """Unproject view i's depth into view j: where visible, depths agree to < 1%. Independent check:
    the renderer's exact ray cast through the projected point in view j hits the same surface."""
    ds = MultiViewScenes(root)
    for scene in ds.scene_ids:
        s = ds.load_views(scene, range(VIEWS))
        prims = S.Primitives(json.loads((root / scene / "meta.json").read_text()))
        for i, j in [(0, 1), (1, 2), (3, 2), (0, 3)]:
            uv, valid = dense_correspondence(
                s["depth"][i], s["K"][i], s["w2c"][i], s["depth"][j], s["K"][j], s["w2c"][j]
            )
            frac = valid.float().mean().item()
            assert frac > (0.5 if abs(i - j) == 1 else 0.2), (scene, i, j, frac)  # strong overlap
            pts = unproject_depth(s["depth"][i], s["K"][i], s["w2c"][i])[valid].double()
            Rj, tj = s["w2c"][j, :3, :3].double(), s["w2c"][j, :3, 3].double()
            z = (pts @ Rj.T + tj)[:, 2]
            # exact depth of view j along the ray through uv (independent of j's depth map)
            uvj = uv[valid].double()
            pix = torch.cat([uvj, torch.ones_like(uvj[:, :1])], -1)
            dirs = (pix @ torch.linalg.inv(s["K"][j].double()).T) @ Rj
            t, idx, _ = S.cast_rays(prims, -Rj.T @ tj, dirs)
            rel = (t.double() - z).abs() / z
            # away from silhouettes in j (3x3 around the landing pixel is one instance): all agree;
            # on them a depth map cannot resolve sub-pixel visibility: nearly all agree
            inst = torch.nn.functional.pad(s["instance"][j][None].float(), (1, 1, 1, 1), mode="replicate")[0]
            r0, c0 = uvj[:, 1].long() + 1, uvj[:, 0].long() + 1
            interior = torch.stack(
                [inst[r0 + dr, c0 + dc] == inst[r0, c0] for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
            ).all(0)
            assert rel[interior].max() < 0.01 and interior.float().mean() > 0.7, (scene, i, j, rel.max())
            assert (rel < 0.01).float().mean() > 0.995 and rel.median() < 1e-3
            same = prims.instance[idx] == s["instance"][i][valid]
            assert same.float().mean() > 0.99


def test_normals_consistent_with_depth(root):
    ds = MultiViewScenes(root)
    s = ds.load_views("synth_0000", range(VIEWS))
    for v in range(VIEWS):
        n = s["normals"][v]
        assert torch.allclose(n.norm(dim=0), torch.ones(64, 64), atol=2e-3)
        pts = unproject_depth(s["depth"][v], s["K"][v])  # camera frame
        assert ((pts * n.permute(1, 2, 0)).sum(-1) < 0).all()  # facing the camera
        # the floor: world points at z = 0, world normal +z
        floor = s["semantic"][v] == 1
        R = s["w2c"][v, :3, :3]
        pw = unproject_depth(s["depth"][v], s["K"][v], s["w2c"][v])[floor]
        assert pw[:, 2].abs().max() < 0.01
        nw = n.permute(1, 2, 0)[floor] @ R
        assert torch.allclose(nw, torch.tensor([0.0, 0.0, 1.0]).expand_as(nw), atol=1e-3)
        # normals from depth gradients (cross product of neighbours) on planar interiors
        dx, dy = pts[1:-1, 2:] - pts[1:-1, :-2], pts[2:, 1:-1] - pts[:-2, 1:-1]
        ng = torch.nn.functional.normalize(torch.linalg.cross(dy, dx, dim=-1), dim=-1)  # faces the camera
        inst = s["instance"][v]
        planar = s["semantic"][v][1:-1, 1:-1] <= 3  # walls, floor, ceiling, boxes
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                planar &= inst[1 + dr : 63 + dr, 1 + dc : 63 + dc] == inst[1:-1, 1:-1]
        cos = (ng * n.permute(1, 2, 0)[1:-1, 1:-1]).sum(-1)[planar]
        ang = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
        assert planar.sum() > 500 and ang.median() < 2.0 and (ang < 10).float().mean() > 0.9, (v, ang.median())


def test_view_dataset(root):
    vd = ViewDataset(root, scene_ids=["synth_0001"])
    assert len(vd) == VIEWS
    item = vd[2]
    assert item["scene"] == "synth_0001" and item["view"] == 2
    assert item["image"].shape == (3, 64, 64) and item["K"].shape == (3, 3) and item["w2c"].shape == (4, 4)
    batch = next(iter(torch.utils.data.DataLoader(ViewDataset(root), batch_size=3)))
    assert batch["depth"].shape == (3, 64, 64) and batch["normals"].shape == (3, 3, 64, 64)


def test_ensure_synthetic_reuses_matching_set(tmp_path):
    r = S.ensure_synthetic(tmp_path / "e", 1, 2, (16, 16), 0)
    img = r / "synth_0000/dslr/undistorted_images/frame_0000.png"
    mtime = img.stat().st_mtime_ns
    assert S.ensure_synthetic(tmp_path / "e", 1, 2, (16, 16), 0) == r and img.stat().st_mtime_ns == mtime
    S.ensure_synthetic(tmp_path / "e", 1, 3, (16, 16), 0)  # other params: regenerated
    assert MultiViewScenes(r).num_views("synth_0000") == 3


def test_split_scenes():
    ids = [f"synth_{i:04d}" for i in range(8)]
    assert S.split_scenes(reversed(ids), 2) == (ids[:6], ids[6:])
    assert S.split_scenes(ids, 0.25) == (ids[:6], ids[6:])
    assert S.split_scenes(ids[:1], 1) == (ids[:1], [])
    assert S.split_scenes(ids[:2], 0.1) == (ids[:1], ids[1:2])


def test_missing_and_corrupt_files(tmp_path):
    r = S.generate(tmp_path / "m", 1, 3, (16, 16), 0)
    with pytest.raises(DataMissingError, match="does not exist"):
        MultiViewScenes(tmp_path / "nowhere")
    ds = MultiViewScenes(r)
    depth = r / "synth_0000/dslr/render_depth/frame_0001.png"
    depth.unlink()
    with pytest.raises(DataMissingError) as e:
        ds.load_views("synth_0000", [1])
    assert str(depth) in e.value.problem and "python -m bench data synthetic" in e.value.fix
    img = r / "synth_0000/dslr/undistorted_images/frame_0000.png"
    img.write_bytes(img.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataMissingError) as e:
        ds.load_views("synth_0000", [0])
    assert str(img) in e.value.problem and "corrupt" in e.value.fix
    img.write_bytes(b"not an image at all")
    with pytest.raises(DataMissingError, match="cannot decode"):
        ds.load_views("synth_0000", [0])
    normals = r / "synth_0000/dslr/render_normal_camera/frame_0002.npz"
    normals.write_bytes(normals.read_bytes()[:100])
    with pytest.raises(DataMissingError, match="frame_0002.npz"):
        ds.load_views("synth_0000", [2])
    with pytest.raises(DataMissingError, match="synth_0009"):
        ds.load_views("synth_0009", [0])


def test_reads_real_scannetpp_layout(tmp_path):
    """A hand-made ScanNet++ DSLR scene: JPG images at half the json's resolution, unsorted frames,
    a bad frame, depth named <file_path>.png, uint16 semantics with 65535 = unlabelled."""
    sdir = tmp_path / "data" / "0a5c013435" / "dslr"
    (sdir / "nerfstudio").mkdir(parents=True)
    (sdir / "undistorted_images").mkdir()
    (sdir / "render_depth").mkdir()
    (sdir / "undistorted_render_semantic").mkdir()
    c2w = opencv_w2c_to_opengl_c2w(S.camera_path(S.make_scene(0, 0, 3), 3))
    frames = [
        {"file_path": f"DSC0000{i}.JPG", "transform_matrix": c2w[i].tolist(), "is_bad": i == 1} for i in (2, 0, 1)
    ]
    tf = {
        "camera_model": "PINHOLE",
        "fl_x": 40.0,
        "fl_y": 41.0,
        "cx": 16.0,
        "cy": 12.0,
        "w": 32,
        "h": 24,
        "k1": 0.0,
        "frames": frames,
        "test_frames": [],
    }
    (sdir / "nerfstudio/transforms_undistorted.json").write_text(json.dumps(tf))
    for i in (0, 1, 2):
        Image.fromarray(np.full((12, 16, 3), 40 * i, np.uint8)).save(sdir / f"undistorted_images/DSC0000{i}.JPG")
        Image.fromarray(np.full((24, 32), 1500 + i, np.uint16)).save(sdir / f"render_depth/DSC0000{i}.JPG.png")
        sem = np.full((24, 32), 7, np.uint16)
        sem[:2] = 65535  # rows 0-1 -> output row 0
        Image.fromarray(sem).save(sdir / f"undistorted_render_semantic/DSC0000{i}.png")
    ds = MultiViewScenes(tmp_path)
    assert ds.scene_ids == ["0a5c013435"] and ds.frame_names("0a5c013435") == ["DSC00000.JPG", "DSC00002.JPG"]
    s = ds.load_views("0a5c013435", [0, 1])
    assert set(s) == {"images", "K", "w2c", "depth", "semantic"}
    assert s["images"].shape == (2, 3, 12, 16) and s["depth"].shape == (2, 12, 16)
    assert torch.allclose(s["K"][0], torch.tensor([[20.0, 0, 8], [0, 20.5, 6], [0, 0, 1]]))
    assert torch.allclose(s["depth"][1], torch.full((12, 16), 1.502))
    assert s["semantic"][0, 0].eq(255).all() and s["semantic"][0, 1:].eq(7).all()
    assert torch.allclose(s["w2c"][1].double(), S.camera_path(S.make_scene(0, 0, 3), 3)[2], atol=1e-6)
    tf["camera_model"] = "OPENCV_FISHEYE"
    tf["k1"] = 0.1
    (sdir / "nerfstudio/transforms_undistorted.json").write_text(json.dumps(tf))
    with pytest.raises(DataMissingError, match="distorted"):
        MultiViewScenes(tmp_path).load_views("0a5c013435", [0])


def test_cli(tmp_path, capsys):
    from bench.cli import main

    assert (
        main(["data", "synthetic", "--scenes", "1", "--views", "2", "--size", "16", "24", "--out", str(tmp_path / "s")])
        == 0
    )
    assert "1 x 2 views at 16x24" in capsys.readouterr().out
    assert (
        main(["data", "synthetic", "--scenes", "1", "--views", "2", "--size", "16", "24", "--out", str(tmp_path / "s")])
        == 0
    )
    assert "reused" in capsys.readouterr().out
    assert MultiViewScenes(tmp_path / "s").load_views("synth_0000", [1])["images"].shape == (1, 3, 16, 24)
    assert main(["data", "scannetpp", "--root", str(tmp_path / "none")]) == 2
    out = capsys.readouterr()
    assert "kaldir.vc.in.tum.de/scannetpp" in out.out and "does not exist" in out.err
    assert main(["data", "scannetpp", "--root", str(tmp_path / "s")]) == 0  # same layout: readable
