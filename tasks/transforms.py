"""Geometric preprocessing of samples (image + dense labels), configured per split.

Keys of a split's node (``task.protocol.train`` / ``task.protocol.test``)::

    resize: [H, W]        # exact size                      } at most one of the two
    resize_short: 512     # shorter side to 512, keep ratio }
    scale_range: [0.5, 2] # train only: random factor on top of the resize (mmseg RandomResize)
    crop: [H, W]          # crop (padded when larger: image 0, depth 0, normals 0, semantic 255)
    crop_mode: random     # random | center
    image_pad: [0.485, 0.456, 0.406]   # train only: crop padding of the image (default 0 = black)
    hflip: true           # train only: random horizontal flip (normals' x component negated)
    crop_box: [45, 472, 43, 608]   # train only, first: fixed crop rows 45:472, cols 43:608 (NYUCrop)
    rotate: {degree: 2.5, p: 0.5}  # train only: RandomRotate (image bilinear, labels nearest, pad 0)
    color_aug: {p: 0.5, gamma: [0.9, 1.1], brightness: [0.75, 1.25], color: [0.9, 1.1]}
    color_jitter: {p: 0.8, brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.2}
    resized_crop: {p: 0.5, scale: [0.5, 1.0], ratio: [1.0, 1.0]}   # nearest, back to the input size
    cat_max_ratio: 0.75   # random crop re-drawn (up to 10 times) while one class covers >= 75 % of it
    photometric: true     # mmseg PhotoMetricDistortion (brightness 32, contrast/saturation 0.5-1.5, hue 18)

Training order: crop_box -> rotate -> resize -> photometric -> crop -> flip -> color_aug ->
color_jitter -> resized_crop, applied to image and labels (labels with nearest neighbour; colour to the image only).
Anchors: depth toolbox ``NYUCrop``/``RandomRotate``/``ColorAug`` (FiT3D/SnD
``evaluation/depth/datasets/pipelines/transforms.py``, NYU/KITTI/ScanNet++ depth configs); ``ColorAug``
works on 0-255 pixels: ``clip((255 x)^gamma * brightness * colour_c, 0, 255)``. Probe3D
``evals/datasets/utils.py::get_nyu_transforms``: ``RandomApply(ColorJitter(0.2, 0.2, 0.2, 0.2), p=0.8)``
and albumentations ``RandomResizedCrop(scale=(0.5, 1), ratio=(1, 1), p=0.5, interpolation=0)``. Test order: centre crop (image and labels), then resize of the *image only*: metrics are
computed at the label resolution, predictions are resized to it (mmseg / Probe3D practice).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

PAD = {"image": 0.0, "depth": 0.0, "normals": 0.0, "semantic": 255}


def _interp(x: torch.Tensor, size: Tuple[int, int], key: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if key == "image":
        down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=down)[0]
    y = x if x.ndim == 3 else x[None]
    y = F.interpolate(y[None].float(), size=size, mode="nearest-exact")[0]
    y = y.to(x.dtype)
    return y if x.ndim == 3 else y[0]


def _nearest(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of any map (albumentations ``interpolation=0``), image included."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = x if x.ndim == 3 else x[None]
    y = F.interpolate(y[None].float(), size=size, mode="nearest")[0].to(x.dtype)
    return y if x.ndim == 3 else y[0]


def target_size(h: int, w: int, cfg: Mapping[str, Any], scale: float = 1.0) -> Tuple[int, int]:
    if cfg.get("resize"):
        h, w = (int(v) for v in cfg["resize"])
    elif cfg.get("resize_short"):
        f = float(cfg["resize_short"]) / min(h, w)
        h, w = int(round(h * f)), int(round(w * f))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def resize(sample: Dict[str, Any], size: Tuple[int, int], labels: bool = True) -> Dict[str, Any]:
    out = dict(sample)
    for k in PAD:
        if k in out and (k == "image" or labels):
            out[k] = _interp(out[k], size, k)
    return out


def crop(
    sample: Dict[str, Any], top: int, left: int, h: int, w: int, image_pad: Optional[Sequence[float]] = None
) -> Dict[str, Any]:
    """Crop a window (top/left may be negative; outside the image is padded).

    ``image_pad``: per-channel image fill in [0,1] (the normalisation mean = mmseg's ``Pad`` with 0
    after ``Normalize``); default 0 (black).
    """
    out = dict(sample)
    for k, fill in PAD.items():
        if k not in out:
            continue
        x = out[k]
        H, W = x.shape[-2:]
        pt, pl = max(-top, 0), max(-left, 0)
        pb, pr = max(top + h - H, 0), max(left + w - W, 0)
        if (pt or pl or pb or pr) and k == "image" and image_pad is not None:
            x = torch.stack([F.pad(c, (pl, pr, pt, pb), value=float(v)) for c, v in zip(x, image_pad)])
        elif pt or pl or pb or pr:
            x = F.pad(x[None] if x.ndim == 2 else x, (pl, pr, pt, pb), value=fill)
            x = x[0] if out[k].ndim == 2 else x
        out[k] = x[..., top + pt : top + pt + h, left + pl : left + pl + w]
    return out


def hflip(sample: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(sample)
    for k in PAD:
        if k in out:
            out[k] = out[k].flip(-1)
    if "normals" in out:
        out["normals"] = out["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def canonical(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The transform config without no-op entries (for cache keys: ``{}`` == ``{hflip: false}``)."""
    out = {k: v for k, v in dict(cfg or {}).items() if v not in (None, False, [], {}) and k != "batch_size"}
    if not out.get("crop"):
        out.pop("crop_mode", None)
    return out


RANDOM_KEYS = ("hflip", "scale_range", "rotate", "color_aug", "color_jitter", "resized_crop", "photometric")


def _crop_ok(semantic: torch.Tensor, ratio: float, ignore: Sequence[int]) -> bool:
    """mmseg ``RandomCrop``: more than one labelled class and the largest below ``ratio`` of them."""
    labels, cnt = torch.unique(semantic, return_counts=True)
    keep = torch.ones_like(labels, dtype=torch.bool)
    for i in ignore:
        keep &= labels != i
    cnt = cnt[keep]
    return len(cnt) > 1 and float(cnt.max()) / float(cnt.sum()) < ratio


def photometric(image: torch.Tensor, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """mmseg ``PhotoMetricDistortion`` on a [0,1] RGB image, on its 0-255 values with uint8 truncation
    after every step (``convert``): brightness +-32 (p .5); contrast x 0.5-1.5 (p .5), first or last
    (p .5 each); saturation x 0.5-1.5 (p .5) and hue +-18 of 180 (p .5) in HSV."""
    import kornia.color as KC

    r = lambda: float(torch.rand((), generator=gen))  # noqa: E731
    coin = lambda: r() < 0.5  # noqa: E731
    img = torch.floor((image * 255.0).clamp(0, 255) + 1e-4)
    conv = lambda x, a=1.0, b=0.0: torch.floor((x * a + b).clamp(0, 255))  # noqa: E731

    def contrast(x):
        return conv(x, 0.5 + r()) if coin() else x

    if coin():
        img = conv(img, b=-32 + 64 * r())
    mode = coin()
    if mode:
        img = contrast(img)
    if coin():
        hsv = KC.rgb_to_hsv(img / 255.0)
        hsv = torch.stack([hsv[0], (torch.floor((hsv[1] * 255 * (0.5 + r())).clamp(0, 255)) / 255.0), hsv[2]])
        img = torch.floor(KC.hsv_to_rgb(hsv).clamp(0, 1) * 255.0 + 1e-4)
    if coin():
        hsv = KC.rgb_to_hsv(img / 255.0)
        h180 = torch.floor(hsv[0] / (2 * math.pi) * 180.0 + 1e-4)
        d = int(torch.randint(-18, 18, (), generator=gen))  # numpy randint(-18, 18): high exclusive
        hsv = torch.stack([torch.remainder(h180 + d, 180.0) / 180.0 * 2 * math.pi, hsv[1], hsv[2]])
        img = torch.floor(KC.hsv_to_rgb(hsv).clamp(0, 1) * 255.0 + 1e-4)
    if not mode:
        img = contrast(img)
    return img / 255.0


def is_augmented(cfg: Mapping[str, Any]) -> bool:
    """Whether a training transform is random (then features cannot be cached)."""
    return bool(
        any(cfg.get(k) for k in RANDOM_KEYS) or (cfg.get("crop") and cfg.get("crop_mode", "random") == "random")
    )


def rotate(sample: Dict[str, Any], degrees: float) -> Dict[str, Any]:
    """Rotate about the centre, same size; image bilinear, labels nearest, outside filled with PAD.
    Normals are rotated with the image plane (their x/y components turn by the same angle)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    out = dict(sample)
    for k, fill in PAD.items():
        if k not in out:
            continue
        x = out[k]
        y = x[None] if x.ndim == 2 else x
        mode = InterpolationMode.BILINEAR if k == "image" else InterpolationMode.NEAREST
        y = TF.rotate(y.float(), float(degrees), interpolation=mode, fill=[float(fill)] * y.shape[0]).to(x.dtype)
        out[k] = y[0] if x.ndim == 2 else y
    if "normals" in out:  # image rotated counter-clockwise by a on screen (y down): v' = R(-a) v in x/y
        import math

        a = math.radians(float(degrees))
        n = out["normals"]
        x, y = n[0], n[1]
        out["normals"] = torch.stack([math.cos(a) * x + math.sin(a) * y, -math.sin(a) * x + math.cos(a) * y, n[2]])
    return out


def color_aug(image: torch.Tensor, gamma: float, brightness: float, colors: Sequence[float]) -> torch.Tensor:
    """Depth-toolbox ``ColorAug`` on a [0,1] image, computed on its 0-255 values as the anchor does."""
    x = (image * 255.0) ** gamma * brightness * torch.tensor(list(colors), dtype=image.dtype).view(3, 1, 1)
    return x.clamp(0, 255) / 255.0


class _Draws:
    """Uniform draws from ``gen`` (the global generator when None), in the order they are asked for."""

    def __init__(self, gen: Optional[torch.Generator]):
        self.gen = gen

    def rand(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def uni(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.rand()


def _random_crop_corner(sample: Dict[str, Any], cfg: Mapping[str, Any], draw: _Draws) -> Tuple[int, int]:
    """``(top, left)`` of the random crop; with ``cat_max_ratio`` re-drawn (up to 10 times) while one class
    covers too much of it (mmseg ``RandomCrop``)."""
    ch, cw = (int(v) for v in cfg["crop"])
    h, w = sample["image"].shape[-2:]
    top, left = int(draw.rand() * (max(h - ch, 0) + 1)), int(draw.rand() * (max(w - cw, 0) + 1))
    ratio = cfg.get("cat_max_ratio")
    if ratio and float(ratio) < 1.0 and "semantic" in sample:
        ignore = [255] + ([0] if cfg.get("cat_ignore_zero") else [])
        for _ in range(10):
            if _crop_ok(crop(sample, top, left, ch, cw)["semantic"], float(ratio), ignore):
                break
            top, left = int(draw.rand() * (max(h - ch, 0) + 1)), int(draw.rand() * (max(w - cw, 0) + 1))
    return top, left


def _train_geometry(sample: Dict[str, Any], cfg: Mapping[str, Any], draw: _Draws, gen) -> Dict[str, Any]:
    """Training transforms up to the flip: crop_box, rotate, resize (scale_range), photometric, crop, hflip."""
    H, W = sample["image"].shape[-2:]
    if cfg.get("crop_box"):
        t, b, l, r = (int(v) for v in cfg["crop_box"])
        sample = crop(sample, t, l, b - t, r - l)
        H, W = sample["image"].shape[-2:]
    rc = cfg.get("rotate")
    if rc and draw.rand() < float(rc.get("p", 0.5)):
        d = float(rc.get("degree", 2.5))
        sample = rotate(sample, draw.uni(-d, d))
    scale = 1.0
    if cfg.get("scale_range"):
        lo, hi = (float(v) for v in cfg["scale_range"])
        scale = lo + (hi - lo) * draw.rand()
    sample = resize(sample, target_size(H, W, cfg, scale))
    if cfg.get("photometric"):  # per-pixel: before the crop's padding, as mmseg pads after it
        sample = dict(sample, image=photometric(sample["image"], gen))
    if cfg.get("crop"):
        ch, cw = (int(v) for v in cfg["crop"])
        h, w = sample["image"].shape[-2:]
        if cfg.get("crop_mode", "random") == "random":
            top, left = _random_crop_corner(sample, cfg, draw)
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        sample = crop(sample, top, left, ch, cw, cfg.get("image_pad"))
    if cfg.get("hflip") and draw.rand() < 0.5:
        sample = hflip(sample)
    return sample


def _train_appearance(sample: Dict[str, Any], cfg: Mapping[str, Any], draw: _Draws, gen) -> Dict[str, Any]:
    """Training transforms after the flip: color_aug, color_jitter, resized_crop."""
    ca = cfg.get("color_aug")
    if ca and draw.rand() < float(ca.get("p", 0.5)):
        g, b, c = ca.get("gamma", [0.9, 1.1]), ca.get("brightness", [0.9, 1.1]), ca.get("color", [0.9, 1.1])
        sample = dict(
            sample, image=color_aug(sample["image"], draw.uni(*g), draw.uni(*b), [draw.uni(*c) for _ in range(3)])
        )
    cj = cfg.get("color_jitter")
    if cj and draw.rand() < float(cj.get("p", 0.8)):
        from torchvision.transforms import ColorJitter

        jit = ColorJitter(
            cj.get("brightness", 0.2), cj.get("contrast", 0.2), cj.get("saturation", 0.2), cj.get("hue", 0.2)
        )
        seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sample = dict(sample, image=jit(sample["image"]).clamp(0, 1))
    rr = cfg.get("resized_crop")
    if rr and draw.rand() < float(rr.get("p", 0.5)):
        sample = _resized_crop(sample, rr, gen)
    return sample


def _resized_crop(sample: Dict[str, Any], rr: Mapping[str, Any], gen) -> Dict[str, Any]:
    """torchvision ``RandomResizedCrop`` parameters (from a seed drawn from ``gen``), then nearest-neighbour
    back to the input size (albumentations ``interpolation=0``)."""
    from torchvision.transforms import RandomResizedCrop

    h, w = sample["image"].shape[-2:]
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, ch, cw = RandomResizedCrop.get_params(
            sample["image"], list(rr.get("scale", [0.5, 1.0])), list(rr.get("ratio", [1.0, 1.0]))
        )
    sample = crop(sample, top, left, ch, cw)
    return {k: (_nearest(v, (h, w)) if k in PAD else v) for k, v in sample.items()}


def apply(
    sample: Dict[str, Any], cfg: Mapping[str, Any], train: bool, gen: Optional[torch.Generator] = None
) -> Dict[str, Any]:
    """The split's transforms of one sample (module docstring): in training, random draws from ``gen``
    (the global generator when None) in the training order; at test time a centre crop, then the image
    alone resized."""
    if train:
        draw = _Draws(gen)
        return _train_appearance(_train_geometry(sample, cfg, draw, gen), cfg, draw, gen)
    H, W = sample["image"].shape[-2:]
    if cfg.get("crop"):
        ch, cw = (int(v) for v in cfg["crop"])
        sample = crop(sample, (H - ch) // 2, (W - cw) // 2, ch, cw)
        H, W = ch, cw
    return resize(sample, target_size(H, W, cfg), labels=False)


class Transformed(Dataset):
    """``dataset`` with only ``keys`` kept and the split's transform applied."""

    def __init__(self, dataset: Dataset, cfg: Mapping[str, Any], train: bool, keys: Sequence[str]):
        self.dataset, self.cfg, self.train, self.keys = dataset, dict(cfg or {}), train, tuple(keys)

    def __len__(self) -> int:
        return len(self.dataset)

    def _sample(self, i: int) -> Dict[str, Any]:
        s = self.dataset[i]
        missing = [k for k in self.keys if k not in s]
        if missing:
            from bench.errors import DataMissingError

            raise DataMissingError(
                f"sample {i} of {type(self.dataset).__name__} has no {', '.join(missing)}",
                "use a dataset/layout that provides these labels for this task",
            )
        return {k: s[k] for k in self.keys}

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return apply(self._sample(i), self.cfg, self.train)

    def seeded_item(self, i: int, gen: torch.Generator) -> Dict[str, Any]:
        """Item ``i`` with its random transforms drawn from ``gen`` (the probe trainer seeds one generator
        per item: the same draws with any number of loader workers, ranks, or after a resume)."""
        return apply(self._sample(i), self.cfg, self.train, gen)
