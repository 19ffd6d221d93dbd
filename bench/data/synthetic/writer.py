"""Writer and worker pool: one scene's files in the ScanNet++ DSLR layout, whole sets rendered in
worker processes, and the reuse / split helpers (:func:`ensure_synthetic`, :func:`split_scenes`)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...cameras import opencv_w2c_to_opengl_c2w
from ...errors import BenchError
from ...io import write_json
from .raycast import Primitives, render_view
from .spec import (
    CLASSES,
    DEPTH,
    GENERATOR,
    IMAGES,
    INSTANCE,
    NORMALS,
    SEMANTIC,
    TRANSFORMS,
    VERSION,
    camera_path,
    default_root,
    intrinsics,
    make_scene,
)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG", compress_level=3)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Compressed ``.npz`` (readable by ``np.load``) with fixed zip timestamps, so byte-identical."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=3) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(
                zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                buf.getvalue(),
                compress_type=zipfile.ZIP_DEFLATED,
                compresslevel=3,
            )


def rgb_u8(rgb: torch.Tensor) -> np.ndarray:
    """``[H,W,3]`` colours in [0,1] -> uint8, rounded (the PNG pixels)."""
    return (rgb.numpy() * 255.0 + 0.5).astype(np.uint8)


def depth_mm(depth: torch.Tensor) -> np.ndarray:
    """``[H,W]`` z-depth in metres (object units) -> uint16 millimetres, 0 stays 0 (the depth PNG)."""
    return np.clip(np.round(depth.numpy().astype(np.float64) * 1000.0), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# Sets: a folder whose meta.json (written last) describes what it holds
# ----------------------------------------------------------------------------------------------
def begin_set(root: str | os.PathLike, valid: bool, problem: str, fix: str) -> Path:
    """``root`` made ready for writing a set, after the caller's parameter check ``valid`` (else a
    :class:`BenchError` ``problem`` / ``fix``): created, and its ``meta.json`` removed, so that a set
    interrupted while being written never counts as complete."""
    if not valid:
        raise BenchError(problem, fix)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)
    return root


def set_meta(root: str | os.PathLike) -> Optional[dict]:
    """The parsed ``root/meta.json`` of a set (None when absent or unreadable)."""
    try:
        return json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def ensure_set(root: Path, holds: Callable[[Path], bool], make: Callable[[Path], Path]) -> Path:
    """``root`` once ``holds(root)``, calling ``make(root)`` unless it already does. Several jobs of a
    sweep may ask for the same set at once: one makes it (a lock file beside ``root``), the others
    wait and then reuse it."""
    if holds(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if holds(root):
            return root
        return make(root)


def reuse_or_generate(root: Path, force: bool, holds: Callable[[Path], bool], make: Callable[[Path], Path]) -> str:
    """The ``python -m bench data`` generators' step: make the set at ``root`` unless it already
    ``holds`` it (and not ``force``); returns how it went, for the summary line."""
    t0 = time.perf_counter()
    if not force and holds(root):
        return "already present, reused (--force regenerates)"
    make(root)
    return f"generated in {time.perf_counter() - t0:.1f} s"


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Render with one torch thread (the ray caster's tensors are small; more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def set_progress(progress: bool, total: int, unit: str, desc: str):
    """A progress bar (terminal) or log lines (:mod:`bench.progress`) when ``progress``, else None."""
    if not progress:
        return None
    from ...progress import progress as _progress

    return _progress(total=total, unit=unit, desc=desc)


def _set_meta(scenes: int, views: int, size: Sequence[int], seed: int, supersample: int, hfov_deg: float) -> dict:
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "scenes": int(scenes),
        "views": int(views),
        "size": [int(size[0]), int(size[1])],
        "seed": int(seed),
        "supersample": int(supersample),
        "hfov_deg": float(hfov_deg),
        "classes": list(CLASSES),
        "scene_ids": [f"synth_{i:04d}" for i in range(scenes)],
    }


def generate_scene(
    root: Path, seed: int, index: int, views: int, size: Sequence[int], supersample: int = 2, hfov_deg: float = 70.0
) -> Path:
    """Render and write one scene; returns its directory."""
    H, W = int(size[0]), int(size[1])
    scene = make_scene(seed, index, views)
    sdir = Path(root) / scene["scene_id"]
    for sub in (IMAGES, DEPTH, NORMALS, SEMANTIC, INSTANCE):
        (sdir / sub).mkdir(parents=True, exist_ok=True)
    K = intrinsics(H, W, hfov_deg)
    w2cs = camera_path(scene, views)
    prims = Primitives(scene)
    frames = []
    for v in range(views):
        name = f"frame_{v:04d}"
        r = render_view(prims, K, w2cs[v], H, W, supersample)
        # plain (non-atomic) writes: the set is only valid once root/meta.json is written at the end
        _write_png(sdir / IMAGES / f"{name}.png", rgb_u8(r["rgb"]))
        _write_png(sdir / DEPTH / f"{name}.png", depth_mm(r["depth"]))
        _write_npz(sdir / NORMALS / f"{name}.npz", normals=r["normals"].numpy().astype(np.float16))
        _write_png(sdir / SEMANTIC / f"{name}.png", r["semantic"].numpy().astype(np.uint8))
        _write_png(sdir / INSTANCE / f"{name}.png", r["instance"].numpy().astype(np.uint16))
        c2w = opencv_w2c_to_opengl_c2w(w2cs[v])
        frames.append({"file_path": f"{name}.png", "transform_matrix": c2w.tolist(), "is_bad": False})
    transforms = {
        "camera_model": "PINHOLE",
        "fl_x": float(K[0, 0]),
        "fl_y": float(K[1, 1]),
        "cx": float(K[0, 2]),
        "cy": float(K[1, 2]),
        "w": W,
        "h": H,
        "frames": frames,
        "test_frames": [],
    }
    write_json(sdir / TRANSFORMS, transforms)
    scene_meta = dict(
        scene,
        generator=GENERATOR,
        version=VERSION,
        views=views,
        size=[H, W],
        supersample=supersample,
        hfov_deg=hfov_deg,
        classes=list(CLASSES),
        instances=[{"id": i + 1, "semantic": s} for i, s in enumerate([0, 0, 0, 0, 1, 2])]
        + [{"id": o["instance"], "semantic": o["semantic"]} for o in scene["objects"]],
    )
    write_json(sdir / "meta.json", scene_meta)
    return sdir


def _worker_main(spec_json: str) -> int:
    """Worker process body (``python -c``, see :func:`_run_workers`): render the scenes listed in the
    JSON spec with one torch thread, printing each index when its files are written."""
    spec = json.loads(spec_json)
    torch.set_num_threads(1)  # 2 workers fill 2 cores without OpenMP oversubscription
    for i in spec["indices"]:
        generate_scene(
            Path(spec["root"]), spec["seed"], i, spec["views"], spec["size"], spec["supersample"], spec["hfov_deg"]
        )
        print(i, flush=True)
    return 0


def _run_workers(root: Path, indices: Sequence[int], workers: int, on_done, **kw) -> None:
    """Render scenes in ``workers`` fresh interpreter processes (``sys.executable -c``), not
    multiprocessing: a spawned multiprocessing child re-imports the caller's ``__main__``, which
    breaks scripts without an ``if __name__ == "__main__"`` guard. Calls ``on_done()`` per scene."""
    import queue
    import subprocess
    import sys
    import tempfile
    import threading

    pkg_parent = str(Path(__file__).resolve().parents[3])  # importable even without an install
    env = dict(
        os.environ,
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p),
    )
    code = "import sys; from bench.data.synthetic.writer import _worker_main; sys.exit(_worker_main(sys.argv[1]))"
    done: "queue.Queue[int]" = queue.Queue()
    procs, readers = [], []
    try:
        for w in range(workers):
            spec = dict(kw, root=str(root), indices=list(indices[w::workers]))
            err = tempfile.TemporaryFile()
            proc = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE, stderr=err, env=env, text=True
            )
            reader = threading.Thread(
                target=lambda p=proc: [done.put(int(line)) for line in p.stdout if line.strip().isdigit()], daemon=True
            )
            reader.start()
            readers.append(reader)
            procs.append((proc, err))
        for _ in indices:
            while True:
                try:
                    done.get(timeout=0.5)
                    break
                except queue.Empty:
                    failed = [(p, e) for p, e in procs if p.poll() not in (None, 0)]
                    if not failed and not any(r.is_alive() for r in readers) and done.empty():
                        failed = procs[:1]  # all output read, all exited cleanly, yet a scene is missing
                    if failed:
                        p, e = failed[0]
                        e.seek(0)
                        tail = e.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                        raise BenchError(
                            f"synthetic scene generation failed in a worker process (exit {p.returncode}): {tail[0]}",
                            "re-run with workers=1 (--workers 1) to see the full traceback",
                        )
            on_done()
        for p, _ in procs:
            p.wait()
    finally:
        for p, e in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            e.close()


# Bytes per ray at the peak of :func:`render_view`'s supersampled pass: its tensors are the cached float64
# camera rays and their float64 build, the float32 world directions, cast_rays' slab distances and
# temporaries, t / axis / idx, the one-hot normals and the shading terms. Measured (peak RSS growth of one
# render, 1 torch thread): 278 MiB for 512x512 at supersample 2 (1.05 M rays = 278 B/ray), ~1 GiB at 1024x1024.
RENDER_BYTES_PER_RAY = 288


def render_memory(size: Sequence[int], supersample: int = 2) -> int:
    """Estimated peak bytes of rendering one ``size`` view with ``supersample``^2 rays per pixel."""
    return int(size[0]) * int(size[1]) * max(int(supersample), 1) ** 2 * RENDER_BYTES_PER_RAY


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``); None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(size: Sequence[int], supersample: int, workers: int, what: str = "size") -> None:
    """Refuse (before any file is written) a view size whose rendering cannot fit in the available memory."""
    need, free = render_memory(size, supersample) * max(int(workers), 1), available_memory()
    if free is not None and need > free:
        raise BenchError(
            f"synthetic {what}={list(size)}: rendering one view needs about {need / 2**30:.1f} GiB of memory "
            f"({workers} worker(s), {supersample}x{supersample} rays per pixel), {free / 2**30:.1f} GiB is available",
            f"use a smaller {what} (memory grows with height x width)",
        )


def default_workers(scenes: int, views: int, size: Sequence[int]) -> int:
    """2 processes for sets large enough to pay for starting them (measured on 2 cores), else 1."""
    return 2 if scenes >= 2 and scenes * views * size[0] * size[1] >= 2_000_000 else 1


def generate(
    root: str | os.PathLike,
    scenes: int = 8,
    views: int = 24,
    size: Sequence[int] = (224, 224),
    seed: int = 0,
    supersample: int = 2,
    hfov_deg: float = 70.0,
    progress: bool = False,
    workers: int | None = None,
) -> Path:
    """Render ``scenes`` x ``views`` and write them under ``root``; ``root/meta.json`` is written last
    (its presence marks a complete set). ``workers``: processes (config ``task.dataset.workers`` or
    ``--workers``; at most one per scene; default :func:`default_workers`). Output does not depend
    on ``workers``."""
    workers = default_workers(scenes, views, size) if workers is None else max(1, min(int(workers), scenes))
    if scenes >= 1 and views >= 1 and min(size) >= 8:
        check_memory(size, supersample, workers)  # before the folder exists: nothing partial is left
    root = begin_set(
        root,
        scenes >= 1 and views >= 1 and min(size) >= 8,
        f"invalid synthetic set: scenes={scenes}, views={views}, size={list(size)}",
        "use at least 1 scene, 1 view and 8x8 pixels",
    )
    kw = dict(seed=seed, views=views, size=list(size), supersample=supersample, hfov_deg=hfov_deg)
    bar = set_progress(progress, scenes, "scene", f"synthetic ({views} views each) -> {root}")
    tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)
    try:
        if workers == 1:
            with one_torch_thread():
                for i in range(scenes):
                    generate_scene(root, seed, i, views, size, supersample, hfov_deg)
                    tick()
        else:
            _run_workers(root, range(scenes), workers, tick, **kw)
    finally:
        if bar is not None:
            bar.close()
    write_json(root / "meta.json", _set_meta(scenes, views, size, seed, supersample, hfov_deg))
    return root


def ensure_synthetic(
    root: str | os.PathLike | None = None,
    scenes: int = 8,
    views: int = 24,
    size: Sequence[int] = (224, 224),
    seed: int = 0,
    supersample: int = 2,
    hfov_deg: float = 70.0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Return ``root`` holding the requested set, generating it only if ``root/meta.json`` does not
    already describe exactly these parameters (and the scenes' transforms are present). ``progress``:
    a bar (terminal) or log lines while it generates."""
    return ensure_set(
        Path(root) if root is not None else default_root(),
        lambda r: holds_set(r, scenes, views, size, seed, supersample, hfov_deg),
        lambda r: generate(r, scenes, views, size, seed, supersample, hfov_deg, progress, workers),
    )


def holds_set(
    root: str | os.PathLike,
    scenes: int,
    views: int,
    size: Sequence[int],
    seed: int,
    supersample: int = 2,
    hfov_deg: float = 70.0,
) -> bool:
    """Whether ``root`` holds a complete generated set with exactly these parameters."""
    root = Path(root)
    want = _set_meta(scenes, views, size, seed, supersample, hfov_deg)
    return set_meta(root) == want and all((root / s / TRANSFORMS).is_file() for s in want["scene_ids"])


def split_scenes(scene_ids: Sequence[str], held_out: int | float = 0.25) -> Tuple[List[str], List[str]]:
    """Deterministic split of scene ids into (train, held_out): the held-out scenes are the last ones
    in sorted order. ``held_out`` is a count (int) or a fraction (float in (0, 1)); at least one scene
    stays in train and, if ``held_out > 0`` and there are >= 2 scenes, at least one is held out."""
    ids = sorted(scene_ids)
    n = len(ids)
    k = int(round(held_out * n)) if isinstance(held_out, float) else int(held_out)
    if held_out and n >= 2:
        k = max(k, 1)
    k = min(max(k, 0), max(n - 1, 0))
    return ids[: n - k], ids[n - k :]
