"""Real-dataset readers on tiny fixtures written in the real file formats (PNG/JPEG via PIL, .mat via
scipy, .npz, .pkl, .json, .txt split lists), plus the `bench data` check and its error messages."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main as cli_main
from bench.errors import DataMissingError
from bench.registry import DATASETS
from helpers import TINY_SEG_LINEAR, run_bench

torch.set_num_threads(2)


def save_rgb(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "RGB").save(path)


def save_u16(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint16)).save(path)  # 16-bit grey PNG


def save_u8(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8), "P" if palette else "L")
    if palette:
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def rand_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reader(name):
    return DATASETS.get(name)


# ------------------------------------------------------------------------------------ NYUv2
def make_nyu_probe3d(root: Path, n_mat: int = 3, n_lab: int = 4):
    import scipy.io

    mean2 = 2 * np.array([122.175, 116.169, 103.508], np.float32)
    imgs = []
    for i in range(n_mat):
        img = rand_rgb(6, 8, i).astype(np.float32)
        imgs.append(img)
        depth = np.full((6, 8), 1.0 + i, np.float32)
        depth[0, 0] = 12.0  # beyond 10 m
        norm = np.zeros((6, 8, 3), np.float32)
        norm[..., 2] = -1.0
        (root / "nyu_geonet").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(
            root / "nyu_geonet" / f"kitchen_{i:04d}.mat", {"img": img - mean2, "depth": depth, "norm": norm}
        )
    data = {
        "images": np.stack([rand_rgb(6, 8, 10 + j).transpose(2, 0, 1) for j in range(n_lab)]),
        "depths": np.stack([np.full((6, 8), 0.5 * (j + 1), np.float32) for j in range(n_lab)]),
        "snorms": np.stack([np.tile(np.array([0, 1, 0], np.float32)[:, None, None], (1, 6, 8))] * n_lab),
        "scene_types": [["kitchen"]] * n_lab,
        "train_indices": np.array([0, 2]),
        "test_indices": np.array([1, 3]),
    }
    with open(root / "nyuv2_snorm_all.pkl", "wb") as f:
        pickle.dump(data, f)
    return imgs, data


def test_nyuv2_probe3d(tmp_path):
    imgs, data = make_nyu_probe3d(tmp_path)
    NYU = reader("nyuv2")
    assert NYU.check(tmp_path) == [] and NYU.check(tmp_path, "probe3d") == []
    train, valid = NYU(tmp_path, "train"), NYU(tmp_path, "valid", layout="probe3d", max_depth=10.0)
    assert [len(train), len(valid), len(NYU(tmp_path, "trainval"))] == [2, 1, 3]  # valid = every 20th (index 0)
    s = valid[0]
    assert s["image"].shape == (3, 6, 8) and s["normals"].shape == (3, 6, 8)
    assert torch.allclose(s["image"] * 255, torch.from_numpy(imgs[0]).permute(2, 0, 1), atol=0.51)
    assert s["depth"][0, 0] == 0 and s["depth"][1, 1] == 1.0  # > max_depth -> invalid
    assert s["K"].shape == (3, 3) and s["name"] == "kitchen_0000"
    test = NYU(tmp_path, "test")
    assert len(test) == 2
    t = test[1]  # test_indices[1] == 3
    assert torch.equal(t["image"], torch.from_numpy(data["images"][3]).float() / 255)
    assert torch.allclose(t["depth"], torch.full((6, 8), 2.0)) and t["normals"][1].eq(1).all()


def test_nyuv2_mmseg_depth_and_seg(tmp_path):
    (tmp_path / "nyu_train.txt").write_text(
        "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579\n"
        "/kitchen_0028b/rgb_00046.jpg None 518.8579\n"
    )
    (tmp_path / "nyu_test.txt").write_text("bathroom/rgb_00001.jpg bathroom/sync_depth_00001.png 518.8579\n")
    for d, stem in (("kitchen_0028b", "00045"), ("bathroom", "00001")):
        save_rgb(tmp_path / d / f"rgb_{stem}.jpg", rand_rgb(5, 7))
        save_u16(tmp_path / d / f"sync_depth_{stem}.png", np.full((5, 7), 2500))
    NYU = reader("nyuv2")
    ds = NYU(tmp_path, "train", layout="mmseg_depth")
    assert len(ds) == 1  # the "None" line is skipped
    s = ds[0]
    assert s["image"].shape == (3, 5, 7) and torch.allclose(s["depth"], torch.full((5, 7), 2.5))
    assert NYU.check(tmp_path) == []  # one complete layout is enough without --layout
    assert NYU.check(tmp_path, "probe3d")  # ... but that layout is incomplete

    for sub in ("training", "validation"):
        save_rgb(tmp_path / "images" / sub / "0001.png", rand_rgb(4, 4))
        save_u8(tmp_path / "annotations" / sub / "0001.png", np.array([[0, 1, 40, 5]] * 4))
    seg = NYU(tmp_path, "val", layout="mmseg_seg")
    assert seg[0]["semantic"].dtype == torch.int64
    assert seg[0]["semantic"][0].tolist() == [0, 1, 40, 5]  # as stored: the task decides reduce_zero_label


# ------------------------------------------------------------------------------------ ScanNet pairs
def make_scannet(root: Path, color_hw=(480, 640)):
    """LoFTR's scannet_test_1500 layout; intrinsics.npz holds the K of the 640x480 depth maps."""
    K = np.array([[577.6, 0, 318.9], [0, 578.7, 242.7], [0, 0, 1]])
    np.savez(root / "test.npz", name=np.array([[707, 0, 15, 45]]))
    np.savez(root / "intrinsics.npz", scene0707_00=K)
    d = root / "scene0707_00"
    poses = {}
    for k, f in enumerate((15, 45)):
        save_rgb(d / "color" / f"{f}.jpg", rand_rgb(*color_hw, f))
        save_u16(d / "depth" / f"{f}.png", np.full((480, 640), 1000 + 500 * k))
        c2w = np.eye(4)
        c2w[:3, 3] = [0.1 * k, 0.0, 0.2]
        (d / "pose").mkdir(parents=True, exist_ok=True)
        np.savetxt(d / "pose" / f"{f}.txt", c2w)
        poses[f] = c2w
    return K, poses


def test_scannet_pairs(tmp_path):
    K, poses = make_scannet(tmp_path)
    SP = reader("scannet_pairs")
    assert SP.check(tmp_path) == [] and SP.check(tmp_path, deep=True) == []
    ds = SP(tmp_path, "test")
    s = ds[0]
    assert len(ds) == 1 and s["id"] == "scene0707_00:15-45"
    assert s["images"].shape == (2, 3, 480, 640) and s["depth"].shape == (2, 480, 640)
    assert torch.allclose(s["depth"][1], torch.full((480, 640), 1.5))
    assert torch.allclose(s["K"][0].double(), torch.from_numpy(K)) and torch.equal(s["K"], s["K_depth"])
    assert torch.allclose(s["w2c"][1].double(), torch.linalg.inv(torch.from_numpy(poses[45])), atol=1e-6)
    (tmp_path / "scene0707_00" / "pose" / "45.txt").unlink()
    assert SP.check(tmp_path, deep=True) == [str(tmp_path / "scene0707_00" / "pose" / "45.txt")]
    with pytest.raises(DataMissingError, match="45.txt"):
        ds[0]


# ------------------------------------------------------------------------------------ NAVI
def test_navi_depth_code_roundtrip():
    from bench.data.navi import decode_navi_depth, encode_navi_depth

    code = np.array([[0, 655, 65535]], np.uint16)
    d = decode_navi_depth(code)
    assert d[0, 0] == 0 and torch.isclose(d[0, 1], torch.tensor(1.0005), atol=1e-4)
    assert torch.isclose(d[0, 2], torch.tensor(0.01))
    assert encode_navi_depth(np.array([1.0005]))[0] == 655


def make_navi(root: Path):
    """obj1 has a wild_set of 3 images (and a multiview scene); image 2 is 150 deg from images 0, 1."""
    import math

    def q_y(deg):  # rotation about y, wxyz
        a = math.radians(deg) / 2
        return [math.cos(a), 0.0, math.sin(a), 0.0]

    wild = root / "obj1" / "wild_set"
    anns = []
    for i, deg in enumerate((0, 40, 150)):
        save_rgb(wild / "images" / f"{i:03d}.jpg", rand_rgb(40, 60, i))
        depth = np.zeros((40, 60))
        depth[10:30, 30:46] = 0.8  # object box in the central square (cols 10..50)
        from bench.data.navi import encode_navi_depth

        save_u16(wild / "depth" / f"{i:03d}.png", encode_navi_depth(depth))
        anns.append(
            {
                "object_id": "obj1",
                "filename": f"{i:03d}.jpg",
                "image_size": [80, 120],
                "camera": {"q": q_y(deg), "t": [0.0, 0.0, 1000.0], "focal_length": 100.0},
            }
        )
    (wild / "annotations.json").write_text(json.dumps(anns))
    (root / "obj1" / "multiview_00_pixel").mkdir(parents=True)
    (root / "obj2" / "wild_set").mkdir(parents=True)  # no multiview scene: excluded from "test"
    (root / "obj2" / "wild_set" / "annotations.json").write_text("[]")


def test_navi_pairs_crop_and_intrinsics(tmp_path):
    make_navi(tmp_path)
    NAVI = reader("navi")
    assert NAVI.check(tmp_path) == []
    ds = NAVI(tmp_path, "test", size=38, every=1)
    pairs = {(a, b) for _, a, b in ds.items}
    # 0 and 1 are 40 deg apart (allowed); 2 is 150 / 110 deg from 0 / 1: only 1 qualifies (<= 120)
    assert ("000", "001") in pairs and ("001", "000") in pairs and ("002", "001") in pairs and len(pairs) == 3
    assert len(NAVI(tmp_path, "test")) == 1  # every 4th of 3 images
    s = NAVI(tmp_path, "test", size=20, every=1)[0]
    assert s["images"].shape == (2, 3, 20, 20) and s["depth"].shape == (2, 20, 20) and s["xyz"].shape == (2, 3, 20, 20)
    assert torch.allclose(s["depth"][s["depth"] > 0], torch.tensor(0.8), atol=2e-3)
    # hand-computed Probe3D rule: 40x60 -> short side 20 (nearest: src = 2 * dst) -> 20x30, centre crop
    # left = 5; object rows 10..29 / cols 30..45 -> rows 5..14, cols 10..17; box (9, 7), side 9, pad (0, 2),
    # start (5, 9); f = 100 * 20/80 = 25, c = (10, 10) -> crop (1, 5) -> x 20/9
    K = s["K"][0]
    assert torch.allclose(K, torch.tensor([[25 * 20 / 9, 0, 20 / 9], [0, 25 * 20 / 9, 100 / 9], [0, 0, 1]]))
    assert torch.allclose(s["w2c"][0][:3, 3], torch.tensor([0.0, 0.0, 1.0]))
    # output (19, 19) <- crop (8, 8) <- 20x20 (13, 17) <- source (26, 44), nearest all the way
    src = read_rgb_file(tmp_path / "obj1" / "wild_set" / "images" / f"{s['id'].split(':')[1].split('-')[0]}.jpg")
    assert torch.equal(s["images"][0][:, 19, 19], src[:, 26, 44])
    d = float(s["depth"][0, 19, 19])
    assert d > 0
    assert torch.allclose(s["xyz"][0][:, 19, 19], torch.tensor([d * 7.5 / 25, d * 3.5 / 25, d]), atol=1e-6)
    assert s["xyz"][0][:, 0, 0].eq(0).all()  # background pixel: no point


def read_rgb_file(path):
    from bench.data.layout import read_rgb

    return read_rgb(path, exif_transpose=True)


def test_navi_probe3d_bbox_rule():
    """Probe3D evals/datasets/utils.py bbox_crop: centred square if it fits, else start = tl - pad (clip 0)."""
    from bench.data.navi import center_crop, probe3d_bbox, resize_short_nearest

    m = torch.zeros(10, 10, dtype=torch.bool)
    m[2:8, 8:10] = True  # near the right edge: tl (2, 8), br (7, 9), box (5, 1), side 5, pad (0, 4)
    assert probe3d_bbox(m) == (2, 4, 5)  # centred start (2, 6) leaves the image -> (2, 8 - 4); a clamp gives (2, 5)
    m = torch.zeros(10, 10, dtype=torch.bool)
    m[0:6, 0:2] = True
    assert probe3d_bbox(m) == (0, 0, 5)
    m = torch.zeros(10, 10, dtype=torch.bool)
    m[3:6, 4:9] = True  # tl (3, 4), box (2, 4), side 4, pad (2, 0): centred (2, 4) fits
    assert probe3d_bbox(m) == (2, 4, 4)
    assert resize_short_nearest(torch.zeros(1, 30, 45), 20).shape == (1, 20, 30)
    assert resize_short_nearest(torch.zeros(1, 45, 31), 20).shape == (1, 29, 20)  # int(20 * 45 / 31) = 29
    x = torch.arange(25.0).reshape(1, 5, 5)
    assert center_crop(x, 2)[0].tolist() == [[12.0, 13.0], [17.0, 18.0]]  # round(1.5) = 2 (Python rounding)
    # the release Probe3D used is google/navi's v1.0 archive, navi_v1.0.tar.gz
    from bench.data.navi import NAVI

    assert "navi-dataset/navi_v1.0.tar.gz" in NAVI.sources and "tar -xzf navi_v1.0.tar.gz" in NAVI.sources


# ------------------------------------------------------------------------------------ SPair-71k
def make_spair(root: Path):
    from bench.data.spair71k import CATEGORIES

    for c in CATEGORIES:
        (root / "JPEGImages" / c).mkdir(parents=True, exist_ok=True)
    for d in ("trn", "val", "test"):
        (root / "PairAnnotation" / d).mkdir(parents=True, exist_ok=True)
    for n in ("2008_000008", "2008_000075", "2008_000100"):
        save_rgb(root / "JPEGImages" / "cat" / f"{n}.jpg", rand_rgb(20, 30))
    for k, (s, t) in enumerate(
        (("2008_000008", "2008_000075"), ("2008_000075", "2008_000100"), ("2008_000008", "2008_000100"))
    ):
        ann = {
            "filename": f"{k:06d}-{s}-{t}:cat",
            "src_imname": f"{s}.jpg",
            "trg_imname": f"{t}.jpg",
            "category": "cat",
            "src_kps": [[1, 2], [10, 12]],
            "trg_kps": [[3, 4], [20, 15]],
            "src_bndbox": [0, 0, 29, 19],
            "trg_bndbox": [2, 3, 22, 13],
            "viewpoint_variation": k % 3,
            "src_imsize": [30, 20, 3],
            "trg_imsize": [30, 20, 3],
        }
        (root / "PairAnnotation" / "test" / f"{k:06d}-{s}-{t}:cat.json").write_text(json.dumps(ann))


def test_spair71k(tmp_path):
    make_spair(tmp_path)
    SPair = reader("spair71k")
    assert SPair.check(tmp_path) == []
    assert len(SPair(tmp_path, "test", pairs_per_category=None)) == 3
    ds = SPair(tmp_path, "test", pairs_per_category=2)
    assert len(ds) == 2 and ds.items == SPair(tmp_path, "test", pairs_per_category=2).items  # seeded
    s = SPair(tmp_path, "test", pairs_per_category=None)[0]
    assert s["image_src"].shape == (3, 20, 30) and s["category"] == "cat" and s["viewpoint_variation"] == 0
    assert s["kps_trg"].tolist() == [[3.0, 4.0], [20.0, 15.0]] and s["bbox_trg"].tolist() == [2, 3, 22, 13]
    assert len(SPair(tmp_path, "train")) == 0
    with pytest.raises(DataMissingError, match="unknown SPair-71k categories"):
        SPair(tmp_path, "test", categories=["unicorn"])


# ------------------------------------------------------------------------------------ ADE20K, VOC
def test_ade20k(tmp_path):
    for sub, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            stem = f"ADE_{sub[:5]}_{i:08d}"
            save_rgb(tmp_path / "images" / sub / f"{stem}.jpg", rand_rgb(6, 9, i))
            save_u8(tmp_path / "annotations" / sub / f"{stem}.png", np.arange(54).reshape(6, 9) % 151)
    ADE = reader("ade20k")
    assert ADE.check(tmp_path) == []
    assert len(ADE(tmp_path, "train")) == 2
    s = ADE(tmp_path, "val")[0]
    assert s["semantic"].tolist() == (np.arange(54).reshape(6, 9) % 151).tolist()  # raw ids, 0 kept


def make_voc(root: Path, aug: bool = True):
    sets = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    voc = root / "VOCdevkit" / "VOC2012"
    lab = np.array([[0, 15, 255], [20, 1, 0]])
    for sid in ("2007_000032", "2007_000039"):
        save_rgb(voc / "JPEGImages" / f"{sid}.jpg", rand_rgb(2, 3))
        save_u8(voc / "SegmentationClass" / f"{sid}.png", lab, palette=True)
    (sets / "train.txt").write_text("2007_000032\n")
    (sets / "val.txt").write_text("2007_000039\n")
    (sets / "trainval.txt").write_text("2007_000032\n2007_000039\n")
    if aug:
        save_rgb(voc / "JPEGImages" / "2008_000002.jpg", rand_rgb(2, 3))
        save_u8(voc / "SegmentationClassAug" / "2008_000002.png", lab)
        (sets / "aug.txt").write_text("2008_000002\n")
    return lab


def test_voc(tmp_path):
    lab = make_voc(tmp_path)
    VOC = reader("voc")
    for root in (tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        assert VOC.check(root) == []
        assert len(VOC(root, "val")) == 1
    s = VOC(tmp_path / "VOCdevkit", "val")[0]
    assert s["semantic"].tolist() == lab.tolist()  # palette indices, 255 boundary kept as ignore
    assert len(VOC(tmp_path / "VOCdevkit", "train_aug")) == 2
    assert VOC(tmp_path / "VOCdevkit", "aug")[0]["semantic"].tolist() == lab.tolist()


# ------------------------------------------------------------------------------------ KITTI
def test_kitti_eigen(tmp_path):
    img_rel = "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png"
    dep_rel = "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png"
    save_rgb(tmp_path / "input" / img_rel, np.zeros((375, 1242, 3)))
    depth = np.zeros((375, 1242))
    depth[-1, 13] = 256 * 10  # bottom-left pixel of the KB window: 10 m
    save_u16(tmp_path / "gt_depth" / dep_rel, depth)
    (tmp_path / "kitti_eigen_test.txt").write_text(f"{img_rel} {dep_rel} 721.5377\n{img_rel} None 721.5377\n")
    (tmp_path / "kitti_eigen_train.txt").write_text("")
    KITTI = reader("kitti_eigen")
    assert KITTI.check(tmp_path) == [] and KITTI.check(tmp_path, deep=True) == []
    ds = KITTI(tmp_path, "test")
    s = ds[0]
    assert len(ds) == 1 and s["image"].shape == (3, 352, 1216)
    assert s["depth"][-1, 0] == 10.0 and s["depth"].sum() == 10.0  # KB crop: top 23, left 13
    assert torch.allclose(s["K"][:2, 2], torch.tensor([609.5593 - 13, 172.8540 - 23]))
    m = s["eval_mask"]  # Garg crop: rows [143, 349), cols [43, 1172)
    assert m.sum() == (349 - 143) * (1172 - 43) and m[143, 43] and not m[142, 43] and not m[143, 1172]


# ------------------------------------------------------------------------------------ errors + CLI
def test_missing_root_and_file_errors(tmp_path):
    NYU = reader("nyuv2")
    with pytest.raises(DataMissingError) as e:
        NYU("/nonexistent/nyu", "test", layout="mmseg_depth")
    assert "/nonexistent/nyu" in str(e.value) and "python -m bench data nyuv2" in str(e.value)
    (tmp_path / "nyu_train.txt").write_text("")
    with pytest.raises(DataMissingError, match="nyu_test.txt"):
        NYU(tmp_path, "train", layout="mmseg_depth")
    with pytest.raises(DataMissingError, match="no split 'bogus'"):
        NYU(tmp_path, "bogus", layout="mmseg_depth")


def test_corrupt_image_names_the_file(tmp_path):
    for sub in ("training", "validation"):
        save_rgb(tmp_path / "images" / sub / "ADE_1.jpg", rand_rgb(4, 4))
        save_u8(tmp_path / "annotations" / sub / "ADE_1.png", np.zeros((4, 4)))
    bad = tmp_path / "images" / "validation" / "ADE_1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataMissingError) as e:
        reader("ade20k")(tmp_path, "val")[0]
    assert str(bad) in str(e.value) and "corrupt" in str(e.value)
    rc = cli_main(["data", "ade20k", "--root", str(tmp_path), "--verify"])
    assert rc == 2


def test_cli_data_complete_prints_counts(tmp_path, capsys):
    make_voc(tmp_path)
    assert cli_main(["data", "voc", "--root", str(tmp_path / "VOCdevkit"), "--deep"]) == 0
    out = capsys.readouterr().out
    assert "voc (voc2012 layout)" in out and "complete" in out and "train_aug" in out
    assert "trainval         2" in out


def test_cli_data_missing_lists_files_and_sources(tmp_path, capsys):
    (tmp_path / "test.npz").write_bytes(b"")
    rc = cli_main(["data", "scannet_pairs", "--root", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 2
    assert str(tmp_path / "intrinsics.npz") in cap.out  # exactly what is missing
    assert "raw.githubusercontent.com/zju3dv/LoFTR" in cap.out and "Terms of Use" in cap.out
    assert "sceneXXXX_YY/depth/<frame>.png" in cap.out  # the expected tree
    assert "error:" in cap.err and "Fix:" in cap.err and "intrinsics.npz" in cap.err


@pytest.mark.slow
def test_cli_subprocess_nonexistent_root():
    r = run_bench("data", "nyuv2", "--root", "/nonexistent", cwd=None, timeout=120)
    assert r.returncode == 2
    assert "/nonexistent (dataset root does not exist)" in r.stdout
    assert "horatio.cs.nyu.edu" in r.stdout and "nyuv2_snorm_all.pkl" in r.stdout
    assert r.stderr.strip().startswith("error: NYU Depth v2 not prepared under /nonexistent")
    assert "Fix:" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ issue 13: protocol fidelity
def _task_cfg(*overrides):
    from bench.config import compose

    return compose(list(overrides))


def test_nyu_seg_is_fit3d_13_class_protocol(tmp_path):
    """FiT3D evaluation/configs/vits_nyu_sem_linear_config.py: num_classes 13, reduce_zero_label, img_scale
    (2048, 512) x ratio 0.5-2, 512 crops, slide 512/341; mmseg/datasets/nyuv2.py: 13 classes, .png images."""
    from tasks.data import open_split, reduce_zero_label

    cfg = _task_cfg("task=nyu_seg", f"paths.data_dir={tmp_path}", "protocol=linear")
    ds, proto = cfg.task.dataset, cfg.task.protocol
    assert ds.num_classes == 13 and ds.reduce_zero_label and ds.root == f"{tmp_path}/nyuv2"
    assert proto.train.resize_short == 512 and list(proto.train.scale_range) == [0.5, 2.0]
    assert list(proto.train.crop) == [512, 512] and proto.test.resize_short == 512
    assert proto.test.sliding.window == 512 and proto.test.sliding.stride == 341
    root = tmp_path / "nyuv2"
    for sub in ("training", "validation"):  # FiT3D's eval_data/nyuv2 layout
        save_rgb(root / "images" / sub / "000001.png", rand_rgb(4, 4))
        save_u8(root / "annotations" / sub / "000001.png", np.array([[0, 1, 13, 7]] * 4))
    s = open_split(ds, "test")[0]
    assert reduce_zero_label(s["semantic"])[0].tolist() == [255, 0, 12, 6]  # 0 = background -> ignore
    # 40-class labels under the 13-class task: one clear error naming the file and the other task
    save_u8(root / "annotations" / "validation" / "000001.png", np.array([[0, 1, 40, 7]] * 4))
    with pytest.raises(DataMissingError, match="label 40, above the 13 classes.*nyu_seg40"):
        open_split(ds, "test")[0]
    cfg40 = _task_cfg("task=nyu_seg40", f"paths.data_dir={tmp_path}")
    assert cfg40.task.dataset.num_classes == 40 and cfg40.task.dataset.root == f"{tmp_path}/nyuv2_40"
    assert open_split(dict(cfg40.task.dataset, root=str(root)), "test")[0]["semantic"][0].tolist() == [0, 1, 40, 7]


def test_voc_seg_trains_on_segmentation_train_txt(tmp_path):
    """FiT3D vits_voc2012_sem_linear_config.py: data.train split ImageSets/Segmentation/train.txt (1,464 ids),
    ann_dir SegmentationClass -- not SBD's train_aug; no SegmentationClassAug is needed."""
    from tasks.data import open_split

    make_voc(tmp_path, aug=False)
    cfg = _task_cfg("task=voc_seg", f"paths.data_dir={tmp_path}")
    assert cfg.task.dataset.splits.train == "train" and cfg.task.dataset.kwargs.layout == "voc2012"
    train = open_split(cfg.task.dataset, "train")
    assert len(train) == 1 and train[0]["id"] == "2007_000032"  # exactly the ids of train.txt
    assert len(open_split(cfg.task.dataset, "test")) == 1


def test_geonet_rgb_is_restored_with_uint8_truncation(tmp_path):
    """Probe3D evals/datasets/nyu.py: img[..., c] += 2 * mean_c (in the stored dtype), then astype(uint8),
    which truncates: a stored value that restores to 36.99998 is 36, not 37."""
    import scipy.io

    from bench.data.nyuv2 import geonet_rgb

    img = np.zeros((480, 640, 3), np.float32)
    img[0, 0] = np.float32(37.0 - 2 * 122.175) - np.float32(2e-5), 10 - 2 * 116.169, 200.5 - 2 * 103.508
    assert float(img[0, 0, 0] + np.float32(2 * 122.175)) < 37.0  # the float error the cast truncates
    assert geonet_rgb(img)[0, 0].tolist() == [36, 10, 200]
    (tmp_path / "nyu_geonet").mkdir()
    scipy.io.savemat(
        tmp_path / "nyu_geonet" / "a_0001.mat",
        {"img": img, "depth": np.ones((480, 640), np.float32), "norm": np.zeros((480, 640, 3), np.float32)},
    )
    with open(tmp_path / "nyuv2_snorm_all.pkl", "wb") as f:
        pickle.dump({"images": [], "depths": [], "snorms": [], "test_indices": []}, f)
    s = reader("nyuv2")(tmp_path, "trainval", layout="probe3d")[0]
    assert (s["image"][:, 0, 0] * 255).round().tolist() == [36.0, 10.0, 200.0]


def test_normals_readers_return_raw_depth(tmp_path):
    """Issue 13 item 6 (reader part): every normals task's samples carry ``depth`` in metres, 0 = missing,
    as loaded (no max-depth cut: the task masks depth > 0 and <= 10 m, Probe3D train_snorm.py)."""
    from tasks.data import open_split

    make_nyu_probe3d(tmp_path / "nyuv2")
    cfg = _task_cfg("task=nyu_normals", f"paths.data_dir={tmp_path}", "protocol=probe3d")
    s = open_split(cfg.task.dataset, "train")[0]
    assert s["normals"].shape == (3, 6, 8) and s["depth"].shape == (6, 8)
    assert s["depth"][0, 0] == 12.0 and s["depth"][1, 1] == 1.0  # raw: the 12 m pixel is not cut here
    t = open_split(cfg.task.dataset, "test")[0]
    assert torch.allclose(t["depth"], torch.full((6, 8), 1.0))  # labelled frame test_indices[0] = 1 -> 0.5 * 2
    # synthetic normals: the scene reader loads render_depth (uint16 mm) beside the normals
    cfg = _task_cfg(
        "task=synth_normals",
        f"paths.data_dir={tmp_path}",
        "task.dataset.scenes=1",
        "task.dataset.views=1",
        "task.dataset.size=16",
        "task.dataset.held_out=0",
    )
    s = open_split(cfg.task.dataset, "train")[0]
    assert s["normals"].shape == (3, 16, 16) and s["depth"].shape == (16, 16)
    assert (s["depth"] > 0).all() and s["depth"].max() < 20  # metres (a room), not millimetres


def test_scannet1500_pair_intrinsics_belong_to_the_640x480_depth(tmp_path):
    """LoFTR src/datasets/scannet.py: intrinsics.npz is the depth camera's K (640x480); Probe3D
    evaluate_scannet_correspondence.py scales it once, K[:2] *= 0.25, for the x0.25 depth. A colour frame
    stored at 1296x968 gets its own K (npz K x colour/640x480); the depth K is never scaled twice."""
    import tasks.correspondence as corr

    K, _ = make_scannet(tmp_path, color_hw=(968, 1296))
    s = reader("scannet_pairs")(tmp_path, "test")[0]
    Kt = torch.from_numpy(K).float()
    assert s["images"].shape[-2:] == (968, 1296) and s["depth"].shape[-2:] == (480, 640)
    assert torch.equal(s["K_depth"][0], Kt) and torch.equal(s["K_depth"][1], Kt)
    assert torch.allclose(s["K"][0], Kt * torch.tensor([[1296 / 640] * 3, [968 / 480] * 3, [1.0] * 3]))
    # the task: image resized to 480x640, depth and K_depth scaled x0.25 once -> 120x160, fx = 577.6 / 4
    Kq, (Hq, Wq) = corr.pair_depth_intrinsics(s, (480, 640), 0.25)
    assert (Hq, Wq) == (120, 160)
    assert torch.allclose(Kq[0], torch.tensor([[144.4, 0, 79.725], [0, 144.675, 60.675], [0, 0, 1]]))


def test_scannetpp_fit3d_processed_layout(tmp_path):
    """FiT3D vits_scannetpp_{depth,sem}_linear_config.py + scannetppdepth.py + mmseg/datasets/scannetpp.py:
    scannetpp_{train,val}.txt '<rgb> <depth>' (leading '/' dropped, None skipped, sorted), depth_scale 1000;
    images/*.JPG + annotations/*.png with 0 = background -> reduce_zero_label, 100 classes."""
    from tasks.data import open_split, reduce_zero_label

    root = tmp_path / "fit3d_eval" / "scannetpp"
    for sc, f, mm in (("0a5c013435", "DSC00010", 1500), ("0a5c013435", "DSC00002", 20000)):
        save_rgb(root / "data" / sc / "images" / f"{f}.JPG", rand_rgb(6, 9))
        save_u16(root / "data" / sc / "depth" / f"{f}.png", np.full((6, 9), mm))
    (root / "scannetpp_train.txt").write_text(
        "/data/0a5c013435/images/DSC00010.JPG /data/0a5c013435/depth/DSC00010.png\n"
        "data/0a5c013435/images/DSC00002.JPG data/0a5c013435/depth/DSC00002.png\n"
        "data/0a5c013435/images/DSC00003.JPG None\n"
    )
    (root / "scannetpp_val.txt").write_text("data/0a5c013435/images/DSC00002.JPG data/0a5c013435/depth/DSC00002.png\n")
    cfg = _task_cfg("task=scannetpp_depth", f"paths.data_dir={tmp_path}")
    assert cfg.task.dataset.name == "scannetpp_fit3d" and cfg.task.dataset.source == "fit3d"
    train = open_split(cfg.task.dataset, "train")
    assert len(train) == 2 and train[0]["id"].endswith("DSC00002.JPG")  # sorted by the RGB path
    assert torch.allclose(train[0]["depth"], torch.full((6, 9), 20.0)) and torch.allclose(
        train[1]["depth"], torch.full((6, 9), 1.5)
    )
    for sub in ("training", "validation"):
        save_rgb(root / "images" / sub / "0a5c013435_DSC00010.JPG", rand_rgb(4, 4))
        save_rgb(root / "images" / sub / "ignored.png", rand_rgb(4, 4))  # not the .JPG suffix
        save_u8(root / "annotations" / sub / "0a5c013435_DSC00010.png", np.array([[0, 1, 100, 37]] * 4))
    seg = _task_cfg("task=scannetpp_seg", f"paths.data_dir={tmp_path}").task.dataset
    assert seg.reduce_zero_label and seg.num_classes == 100
    ds = open_split(seg, "test")
    assert len(ds) == 1 and reduce_zero_label(ds[0]["semantic"])[0].tolist() == [255, 0, 99, 36]
    dslr = _task_cfg("task=scannetpp_seg", f"paths.data_dir={tmp_path}", "task.dataset.source=dslr").task.dataset
    assert dslr.name == "scannetpp" and not dslr.reduce_zero_label and dslr.splits.train == "splits/nvs_sem_train.txt"
    assert cli_main(["data", "scannetpp_fit3d", "--root", str(root)]) == 0


def test_scannet_fit3d_depth_and_seg_tasks(tmp_path, capsys):
    """FiT3D vits_scannet_{depth,sem}_linear_config.py: scannet_{train,val}.txt, depth_scale 1000, Eigen crop
    45:471 x 41:601 of 640x480, 0.001 < d < 10 m; seg 40 classes, reduce_zero_label, .jpg images."""
    from tasks.data import open_split

    root = tmp_path / "fit3d_eval" / "scannet"
    save_rgb(root / "scene0000_00" / "color" / "0.jpg", rand_rgb(480, 640))
    save_u16(root / "scene0000_00" / "depth" / "0.png", np.full((480, 640), 2345))
    for s in ("train", "val"):
        (root / f"scannet_{s}.txt").write_text("scene0000_00/color/0.jpg scene0000_00/depth/0.png\n")
    cfg = _task_cfg("task=scannet_depth", f"paths.data_dir={tmp_path}", "protocol=linear")
    ev = cfg.task.protocol.eval
    assert ev.crop == "eigen" and ev.min_depth == 0.001 and ev.max_depth == 10.0
    s = open_split(cfg.task.dataset, "test")[0]
    assert s["image"].shape == (3, 480, 640) and torch.allclose(s["depth"], torch.full((480, 640), 2.345))
    from tasks.metrics import crop_mask

    m = crop_mask(480, 640, ev.crop)  # scannetdepth.py eval_mask[45:471, 41:601] = 1
    assert m.sum() == 426 * 560 and m[45, 41] and m[470, 600] and not m[44, 41] and not m[471, 600] and not m[45, 601]
    seg = _task_cfg("task=scannet_seg", f"paths.data_dir={tmp_path}").task.dataset
    assert seg.num_classes == 40 and seg.reduce_zero_label and seg.kwargs.layout == "fit3d_seg"
    with pytest.raises(DataMissingError, match="scannet_fit3d"):
        open_split(seg, "test")  # the seg folders are not there: the error names the `bench data` command
    rc = cli_main(["data", "scannet_fit3d", "--root", str(root)])
    out = capsys.readouterr().out
    assert rc == 0 and "fit3d_depth layout) at" in out and "fit3d_seg layout): not prepared" in out
    # Splat-and-Distill evaluation1 names the same lists train_index.txt / test_index.txt
    (root / "scannet_train.txt").rename(root / "train_index.txt")
    (root / "scannet_val.txt").rename(root / "test_index.txt")
    assert len(open_split(cfg.task.dataset, "test")) == 1 and len(open_split(cfg.task.dataset, "train")) == 1


@pytest.mark.slow
def test_fit3d_eval_tasks_run_end_to_end(tmp_path):
    """scannet_depth and scannetpp_seg through the dense-probe pipeline on FiT3D-layout fixtures (tiny_cnn)."""
    import math

    from bench.backbones import build_backbone
    from bench.registry import TASKS

    g = np.random.default_rng(0)
    root = tmp_path / "fit3d_eval" / "scannet"
    lines = []
    for k in range(3):
        save_rgb(root / "s" / "color" / f"{k}.jpg", rand_rgb(48, 64, k))
        save_u16(root / "s" / "depth" / f"{k}.png", g.integers(500, 4000, (48, 64)))
        lines.append(f"s/color/{k}.jpg s/depth/{k}.png")
    (root / "scannet_train.txt").write_text("\n".join(lines[:2]) + "\n")
    (root / "scannet_val.txt").write_text(lines[2] + "\n")
    pp = tmp_path / "fit3d_eval" / "scannetpp"
    for sub, n in (("training", 2), ("validation", 1)):
        for k in range(n):
            save_rgb(pp / "images" / sub / f"x_{k}.JPG", rand_rgb(40, 40, k))
            save_u8(pp / "annotations" / sub / f"x_{k}.png", g.integers(0, 5, (40, 40)))
    common = [
        "backbone=tiny_cnn",
        f"paths.data_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
        "task.progress=false",
    ]
    bb = build_backbone(_task_cfg("backbone=tiny_cnn").backbone)
    cfg = _task_cfg(
        "task=scannet_depth",
        *common,
        "task.protocols.linear.train.crop=[32,48]",
        "task.protocols.linear.schedule.iters=2",
        "task.protocols.linear.schedule.warmup_iters=1",
        "task.protocols.linear.schedule.batch_size=2",
    )
    TASKS.get("scannet_depth")().check(cfg)
    m = TASKS.get("scannet_depth")().evaluate(bb, cfg, tmp_path / "d")
    assert math.isfinite(m["rmse"]) and 0 <= m["a1"] <= 1
    cfg = _task_cfg(
        "task=scannetpp_seg",
        *common,
        *TINY_SEG_LINEAR,
    )
    m = TASKS.get("scannetpp_seg")().evaluate(bb, cfg, tmp_path / "s")
    assert 0 <= m["mIoU"] <= 100


def test_verify_reports_every_bad_file_not_only_the_first(tmp_path, capsys):
    for sub in ("training", "validation"):
        for i in (1, 2):
            save_rgb(tmp_path / "images" / sub / f"ADE_{i}.jpg", rand_rgb(4, 4))
            save_u8(tmp_path / "annotations" / sub / f"ADE_{i}.png", np.zeros((4, 4)))
    bad = [tmp_path / "images" / "training" / "ADE_2.jpg", tmp_path / "images" / "validation" / "ADE_1.jpg"]
    for p in bad:
        p.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    assert cli_main(["data", "ade20k", "--root", str(tmp_path), "--deep", "--verify"]) == 2
    out = capsys.readouterr().out
    assert all(str(p) in out for p in bad), out
    assert str(tmp_path / "images" / "training" / "ADE_1.jpg") not in out  # a good file is not listed
