"""Sliding-window inference (mmseg ``slide_inference``).

Windows of ``window`` pixels every ``stride`` pixels; the last window in each direction is shifted
back to end at the border, and windows never exceed the image (an image smaller than the window is
one window). Overlapping predictions are averaged.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch

Size = Union[int, Sequence[int]]


def _pair(x: Size) -> Tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Start offsets of the windows along one axis (mmseg's grid)."""
    n = max(length - window + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + window, length) - window, 0) for i in range(n)})


def slide_inference(
    predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, window: Size, stride: Size
) -> torch.Tensor:
    """Average ``predict(crop) -> [B,K,h,w]`` over sliding windows of ``image`` ``[B,3,H,W]``."""
    (wh, ww), (sh, sw) = _pair(window), _pair(stride)
    H, W = image.shape[-2:]
    out = count = None
    for y in window_starts(H, wh, sh):
        for x in window_starts(W, ww, sw):
            crop = image[..., y : y + min(wh, H), x : x + min(ww, W)]
            pred = predict(crop)
            if out is None:
                out = pred.new_zeros(pred.shape[0], pred.shape[1], H, W)
                count = pred.new_zeros(1, 1, H, W)
            out[..., y : y + crop.shape[-2], x : x + crop.shape[-1]] += pred
            count[..., y : y + crop.shape[-2], x : x + crop.shape[-1]] += 1
    return out / count
