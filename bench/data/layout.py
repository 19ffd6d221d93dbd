"""Shared machinery of the real-dataset readers: file checks, decoding with clear errors, `bench data`.

Every reader (``bench/data/<dataset>.py``) subclasses :class:`FileDataset` and declares, as class
attributes, where the data comes from (``sources``), its licence terms (``licence``) and the tree it
expects under ``--root`` for each layout (``trees``). It implements

* ``required(root, layout)`` -- the few files/folders whose absence means "not prepared" (cheap);
* ``index(root, layout, split)`` -- the list of samples of a split (paths, parsed once);
* ``__getitem__`` -- decode one sample into the shared dict convention (image [3,H,W] in [0,1],
  depth [H,W] metres with 0 = invalid, normals [3,H,W], semantic [H,W] int64 with 255 = ignore, ...).

From these the base class derives ``check(root)`` (what is missing), the constructor's error when the
data is absent, and the ``python -m bench data <name>`` command (``add_arguments`` + ``cli``), which
prints the download sources, licence notes and the expected tree when something is missing and a
per-split count when everything is there.
"""

from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import DataMissingError, missing_file, what_is_at
from ..registry import DATASETS

#: how many missing paths a message lists before summarising the rest
MAX_LISTED = 12


def default_root(dirname: str) -> Path:
    """``$BENCH_DATA/<dirname>`` (``./data/<dirname>`` when ``BENCH_DATA`` is unset)."""
    return Path(os.environ.get("BENCH_DATA", "data")) / dirname


def fmt_missing(paths: Sequence[str], limit: int = MAX_LISTED) -> str:
    shown = list(paths[:limit])
    more = len(paths) - len(shown)
    return ", ".join(shown) + (f" (and {more} more)" if more > 0 else "")


# ----------------------------------------------------------------------------------- registration
def register_reader(name: str, description: str):
    """Class decorator: register a :class:`FileDataset` reader in ``DATASETS`` as ``name`` (also its
    ``name`` attribute, which ``python -m bench data <name>`` and the messages use)."""

    def deco(cls):
        cls.name = name
        return DATASETS.register(name, description)(cls)

    return deco


def register_command(name: str, description: str, add_arguments, cli) -> type:
    """Register a ``DATASETS`` entry that is only the ``python -m bench data <name>`` command (a
    generator or checker whose data is read elsewhere); returns the entry."""
    entry = type(
        f"{name}_command",
        (),
        {"add_arguments": staticmethod(add_arguments), "cli": staticmethod(cli), "__doc__": description},
    )
    return DATASETS.register(name, description)(entry)


# ----------------------------------------------------------------------------------- decoding
LAYOUT_FIX = "re-extract the dataset archive; `python -m bench data <name> --root ...` lists the expected layout"


def open_image(path: Path, fix: Optional[str] = None):
    """A decoded PIL image; a missing or corrupt file is a :class:`DataMissingError` (``fix``: how to repair)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataMissingError(missing_file(path), fix or LAYOUT_FIX)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        repair = fix or "replace it from the original archive"
        raise DataMissingError(
            f"cannot decode image {path} ({type(e).__name__}: {e})", f"the file is corrupt or truncated: {repair}"
        ) from None


def read_rgb(path: Path, exif_transpose: bool = False) -> torch.Tensor:
    """An RGB image as float [3,H,W] in [0,1]."""
    img = open_image(path)
    if exif_transpose:
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def read_array(path: Path) -> np.ndarray:
    """The raw pixel values of a single-channel PNG: 16-bit depth stays 16-bit, palette PNGs give indices."""
    img = open_image(path)
    if img.mode in ("RGB", "RGBA"):
        raise DataMissingError(
            f"{path} is an {img.mode} image where a single-channel map was expected",
            "use the label/depth PNGs of the original release (palette or grey, not colour)",
        )
    return np.asarray(img)


def read_depth_png(path: Path, scale: float) -> torch.Tensor:
    """A 16-bit depth PNG divided by ``scale`` (1000 for mm, 256 for KITTI) -> [H,W] metres, 0 invalid."""
    arr = read_array(path).astype(np.float32) / float(scale)
    return torch.from_numpy(arr)


def read_label_png(path: Path) -> torch.Tensor:
    """A label PNG -> int64 [H,W], ids as stored (palette PNGs give palette indices).

    Readers never apply ``reduce_zero_label``: the task config decides (see tasks/data.py)."""
    return torch.from_numpy(read_array(path).astype(np.int64))


def verify_image(path: Path) -> Optional[str]:
    """None if ``path`` decodes, otherwise the reason."""
    try:
        open_image(path)
    except DataMissingError as e:
        return e.problem
    return None


# ----------------------------------------------------------------------------------- base class
class FileDataset(torch.utils.data.Dataset):
    """Base of the real-dataset readers. Subclasses set the class attributes and implement
    :meth:`required`, :meth:`index` and :meth:`__getitem__`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    dirname: ClassVar[str] = ""  # default folder under $BENCH_DATA
    layouts: ClassVar[Sequence[str]] = ("default",)
    splits: ClassVar[Mapping[str, Sequence[str]]] = {"default": ("test",)}
    sources: ClassVar[str] = ""  # where to get it (URLs, commands)
    licence: ClassVar[str] = ""
    trees: ClassVar[Mapping[str, str]] = {}  # expected tree per layout

    def __init__(self, root: str | os.PathLike, split: str, layout: Optional[str] = None):
        super().__init__()
        self.root = Path(root)
        self.layout = self._layout(layout)
        valid = self.splits[self.layout]
        if split not in valid:
            raise DataMissingError(
                f"{self.name} ({self.layout} layout) has no split '{split}'", f"use one of: {', '.join(valid)}"
            )
        self.split = split
        missing = self.missing(self.root, self.layout)
        if missing:
            raise DataMissingError(
                f"{self.title} ({self.layout} layout) not found under {self.root}: missing {fmt_missing(missing, 4)}",
                f"prepare it as `python -m bench data {self.name} --root {self.root}"
                + (f" --layout {self.layout}" if len(self.layouts) > 1 else "")
                + "` explains (download links, expected tree)",
            )
        self.items: List[Any] = self.index(self.root, self.layout, split)

    # -- to implement -------------------------------------------------------------------------
    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        raise NotImplementedError

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        raise NotImplementedError

    @classmethod
    def count(cls, root: Path, layout: str, split: str) -> int | str:
        """Number of samples of a split for the summary (a note instead where counting is costly)."""
        return len(cls.index(root, layout, split))

    @classmethod
    def item_files(cls, item: Any) -> List[Path]:
        """The files one indexed sample reads (for the deep check)."""
        return []

    # -- derived ------------------------------------------------------------------------------
    @classmethod
    def _layout(cls, layout: Optional[str]) -> str:
        layout = layout or cls.layouts[0]
        if layout not in cls.layouts:
            raise DataMissingError(f"{cls.name} has no layout '{layout}'", f"use one of: {', '.join(cls.layouts)}")
        return layout

    @classmethod
    def missing(cls, root: Path, layout: str, deep: bool = False) -> List[str]:
        """Missing paths of one layout (as strings); ``deep`` also checks every file that the
        splits' indexes reference."""
        root = Path(root)
        if not root.is_dir():
            return [f"{root} (dataset root {what_is_at(root, 'directory')})"]
        missing = [str(p) for p in cls.required(root, layout) if not p.exists()]
        if missing or not deep:
            return missing
        seen = set()
        for split in cls.splits[layout]:
            for item in cls.index(root, layout, split):
                for p in cls.item_files(item):
                    if p not in seen:
                        seen.add(p)
                        if not p.exists():
                            missing.append(str(p))
        return missing

    @classmethod
    def check(cls, root: str | os.PathLike, layout: Optional[str] = None, deep: bool = False) -> List[str]:
        """What is missing under ``root`` (empty when prepared). Without ``layout``, a dataset with
        several layouts counts as prepared when any one of them is complete; otherwise the missing
        files of every layout are listed, each tagged with its layout."""
        root = Path(root)
        if layout is not None or len(cls.layouts) == 1:
            return cls.missing(root, cls._layout(layout), deep)
        if not root.is_dir():
            return [f"{root} (dataset root {what_is_at(root, 'directory')})"]
        out = []
        for lay in cls.layouts:
            miss = cls.missing(root, lay, deep)
            if not miss:
                return []
            out += [f"{m} ({lay} layout)" for m in miss]
        return out

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def guide(cls, layouts: Sequence[str], root: Path) -> str:
        trees = "\n".join(
            f"Expected tree ({lay} layout) under {root}:\n{_indent(cls.trees.get(lay, ''))}" for lay in layouts
        )
        return (
            f"{cls.title}\n\nWhere to get it:\n{_indent(cls.sources)}\n\n"
            f"Licence / terms:\n{_indent(cls.licence)}\n\n{trees}"
        )

    # -- `python -m bench data <name>` ---------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--root",
            type=Path,
            default=default_root(cls.dirname or cls.name),
            help=f"dataset root (default: $BENCH_DATA/{cls.dirname or cls.name})",
        )
        if len(cls.layouts) > 1:
            parser.add_argument(
                "--layout",
                choices=list(cls.layouts),
                default=None,
                help="check only this layout (default: all; passes if one is complete)",
            )
        parser.add_argument("--deep", action="store_true", help="also check every file the split lists reference")
        parser.add_argument("--verify", action="store_true", help="with --deep: also decode every image (slow)")

    @classmethod
    def cli(cls, args: argparse.Namespace) -> int:
        root = Path(args.root)
        layouts = [args.layout] if getattr(args, "layout", None) else list(cls.layouts)
        deep = bool(getattr(args, "deep", False) or getattr(args, "verify", False))
        complete, report = [], []
        for layout in layouts:
            missing = cls.missing(root, layout, deep=deep)
            if not missing and getattr(args, "verify", False):
                missing = cls._verify(root, layout)
            if missing:
                report.append((layout, missing))
                continue
            complete.append(layout)
            print(f"{cls.name} ({layout} layout) at {root}: complete")
            for s in cls.splits[layout]:
                n = cls.count(root, layout, s)
                print(f"  {s:<10s} {n:>7d}" if isinstance(n, int) else f"  {s:<10s} {n}")
        if complete:
            for layout, missing in report:
                print(f"{cls.name} ({layout} layout): not prepared (missing {fmt_missing(missing, 3)})")
            return 0
        for layout, missing in report:
            print(f"{cls.name} ({layout} layout) at {root}: incomplete. Missing:")
            for m in missing[:MAX_LISTED]:
                print(f"  {m}")
            if len(missing) > MAX_LISTED:
                print(f"  ... and {len(missing) - MAX_LISTED} more")
        print()
        print(cls.guide([lay for lay, _ in report], root))
        print()
        first = report[0][1]
        raise DataMissingError(
            f"{cls.title} not prepared under {root}: missing {fmt_missing(first, 3)}",
            "download and arrange it as printed above, then re-run this check",
        )

    @classmethod
    def _verify(cls, root: Path, layout: str) -> List[str]:
        bad = []
        for split in cls.splits[layout]:
            for item in cls.index(root, layout, split):
                for p in cls.item_files(item):
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                        why = verify_image(p)
                        if why:
                            bad.append(why)
        return bad


class ImageLabelDataset(FileDataset):
    """A reader whose items are (image path, label PNG path) pairs (ADE20k, VOC, ...)."""

    @classmethod
    def item_files(cls, item: Any) -> List[Path]:
        return list(item)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        img, lab = self.items[i]
        return {"image": read_rgb(img), "semantic": read_label_png(lab), "id": img.stem}


def _indent(text: str, pad: str = "  ") -> str:
    return "\n".join(pad + line if line else line for line in text.strip("\n").splitlines())


def read_lines(path: Path) -> List[str]:
    """Non-empty, stripped lines of a text file (a split list), with a clear error if absent."""
    if not path.is_file():
        raise DataMissingError(f"missing split file {path}", "see `python -m bench data <name>` for the layout")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def load_npz(path: Path, fix: Optional[str] = None, keys: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (no pickles); a missing or corrupt file, or a missing one of ``keys``,
    is a :class:`DataMissingError` (``fix``: how to repair)."""
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(missing_file(path), fix or "see `python -m bench data <name>` for the layout")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataMissingError(
            f"cannot read {path} ({type(e).__name__}: {e})",
            "the file is corrupt or truncated: " + (fix or "download it again"),
        ) from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise DataMissingError(
            f"{path} has no array {', '.join(missing)} (it has: {', '.join(out) or 'none'})",
            fix or "see `python -m bench data <name>` for the layout",
        )
    return out
