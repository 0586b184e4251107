"""`resize_interpolation`: how a training image is resized to its bucket, by sd-scripts' names.

sd-scripts resizes with PIL for `lanczos` and `box`, and with OpenCV for the others. This project has
no OpenCV, so those are computed here with OpenCV's rules: `nearest` is PIL's nearest neighbour
(OpenCV's INTER_NEAREST_EXACT gives the same pixels, by its documentation); `bilinear`/`linear` and
`bicubic`/`cubic` sample at pixel centres without antialiasing, the cubic kernel's a = -0.75, edges
repeated (OpenCV's INTER_LINEAR / INTER_CUBIC, via torch); `area` averages the source pixels by the
area each covers (OpenCV's INTER_AREA). The results match OpenCV's up to its fixed-point rounding.

Unset, sd-scripts' default: `area` for an image that shrinks (or keeps its size) on both sides,
`lanczos` otherwise (sd-scripts' `resize_image`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# sd-scripts' `validate_interpolation_fn` names (its --resize_interpolation choices lack "box").
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
CLI_RESIZE_INTERPOLATIONS = tuple(name for name in RESIZE_INTERPOLATIONS if name != "box")
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX}
_TORCH_MODES = {"bilinear": "bilinear", "linear": "bilinear", "bicubic": "bicubic", "cubic": "bicubic"}


def resize_image(image: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """The 8-bit `image` (RGB, or one channel such as a mask) resized to `size` (width, height) with
    `interpolation` (None: sd-scripts' default, `default_interpolation`)."""
    name = interpolation or default_interpolation(image.size, size)
    if name in _PIL_FILTERS:
        return image.resize(size, _PIL_FILTERS[name])
    pixels = np.asarray(image, dtype=np.uint8)
    planes = pixels.reshape(*pixels.shape[:2], -1)  # (H, W, channels)
    if name == "area":
        resized = _area(_area(planes.astype(np.float64), size[1], axis=0), size[0], axis=1)
    else:
        tensor = torch.from_numpy(planes.astype(np.float32)).permute(2, 0, 1)[None]
        tensor = F.interpolate(tensor, size=(size[1], size[0]), mode=_TORCH_MODES[name], align_corners=False)
        resized = tensor[0].permute(1, 2, 0).numpy()
    resized = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return Image.fromarray(resized if pixels.ndim == 3 else resized[..., 0])


def default_interpolation(source: tuple[int, int], target: tuple[int, int]) -> str:
    """sd-scripts' choice when `resize_interpolation` is unset: `area` when neither side grows."""
    return "area" if source[0] >= target[0] and source[1] >= target[1] else "lanczos"


def _area(pixels: np.ndarray, length: int, axis: int) -> np.ndarray:
    """`pixels` resampled to `length` along `axis`, each output pixel the mean of the source it covers
    (fractions of a source pixel at its edges count by the fraction), from the running sum."""
    source = np.moveaxis(pixels, axis, 0)
    count = source.shape[0]
    running = np.concatenate([np.zeros_like(source[:1]), np.cumsum(source, axis=0)])  # running[k] = sum of [0, k)
    edges = np.arange(length + 1) * (count / length)  # output pixel i covers [edges[i], edges[i + 1])
    whole = np.minimum(np.floor(edges).astype(np.int64), count - 1)
    fraction = (edges - whole).reshape(-1, *([1] * (source.ndim - 1)))
    covered = running[whole] + fraction * source[whole]  # the sum of the source over [0, edge)
    return np.moveaxis((covered[1:] - covered[:-1]) / (count / length), 0, axis)
