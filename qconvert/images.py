"""Image files as a model's single image input: decoding, resizing and normalization.

An image folder (`dataset`, layout 5) is read through `ImageReader`, with the user's
`ImagePreprocessing`. Pillow is imported on the first image, so that the other layouts do
not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qconvert.errors import CalibrationDataError, ConfigError
from qconvert.limits import LoadLimits

if TYPE_CHECKING:
    from qconvert.dataset import InputSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class ImagePreprocessing:
    """How an image file becomes a model input.

    Attributes:
        size: (height, width) of the input; None takes them from the model's static dims.
        crop: scale the shorter side to the size and centre-crop the rest (keeps the aspect
            ratio); otherwise the image is resized to the size.
        scale: pixels (0..255) are multiplied by this first.
        mean: subtracted per channel after scaling (one value, or one per channel).
        std: divides per channel after the mean.
        layout: "NCHW" or "NHWC"; None infers it from the model input (channels 1 or 3).
        color: "RGB" or "BGR" channel order (one-channel inputs read grayscale).
    """

    size: tuple[int, int] | None = None
    crop: bool = False
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None
    color: str = "RGB"

    def __post_init__(self) -> None:
        if self.layout not in (None, "NCHW", "NHWC"):
            raise ConfigError(f"Unknown layout '{self.layout}'; use NCHW or NHWC.")
        if self.color not in ("RGB", "BGR"):
            raise ConfigError(f"Unknown color order '{self.color}'; use RGB or BGR.")
        if any(value == 0 for value in self.std):
            raise ConfigError("--std values must not be 0.")
        if self.size is not None and min(self.size) < 1:
            raise ConfigError(f"Image size {self.size} must be positive.")


def _too_many_pixels(path: Path, size: str, limit: int) -> CalibrationDataError:
    return CalibrationDataError(
        f"Image '{path}' is {size}, over the limit of {limit:,}.",
        hint="raise the limit with --max-image-pixels if the machine can hold it.",
    )


class ImageReader:
    """Turns image files into the model's single image input."""

    def __init__(
        self,
        folder: Path,
        specs: tuple[InputSpec, ...],
        preprocessing: ImagePreprocessing,
        limits: LoadLimits,
    ) -> None:
        self.limits = limits
        if len(specs) != 1 or len(specs[0].dims) != 4:
            raise CalibrationDataError(
                f"Data folder '{folder}' holds images, but the model's inputs are not one "
                f"image batch (N,C,H,W or N,H,W,C): "
                + ", ".join(f"{s.name} {s.describe()}" for s in specs)
                + "."
            )
        self.spec = spec = specs[0]
        dims = spec.dims
        layout = preprocessing.layout
        if layout is None:
            if dims[1] in (1, 3):
                layout = "NCHW"
            elif dims[3] in (1, 3):
                layout = "NHWC"
            else:
                raise CalibrationDataError(
                    f"Cannot tell the channel axis of input '{spec.name}' {spec.describe()}.",
                    hint="pass --layout NCHW or --layout NHWC.",
                )
        channel_axis, spatial = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
        channels = dims[channel_axis] or 3
        size = preprocessing.size
        if size is None:
            height, width = (dims[axis] for axis in spatial)
            if height is None or width is None:
                raise CalibrationDataError(
                    f"Input '{spec.name}' {spec.describe()} has a dynamic image size.",
                    hint="pass --image-size HEIGHT,WIDTH.",
                )
            size = (height, width)
        if channels not in (1, 3):
            raise CalibrationDataError(
                f"Input '{spec.name}' {spec.describe()} has {channels} channels; images "
                "give 1 (grayscale) or 3."
            )
        for name, values in (("mean", preprocessing.mean), ("std", preprocessing.std)):
            if len(values) not in (1, channels):
                raise ConfigError(
                    f"--{name} has {len(values)} values; the input has {channels} channels."
                )
        self.layout, self.channels, self.size = layout, channels, size
        self.preprocessing = preprocessing

    def bind(self, path: Path) -> Callable[[], dict[str, np.ndarray]]:
        """A reader of `path`'s feeds, called when the sample is wanted."""
        return lambda: {self.spec.name: self.read(path)}

    def read(self, path: Path) -> np.ndarray:
        """The image at `path` as the input's array, with a batch dim of 1.

        Raises:
            CalibrationDataError: Pillow is missing, or the file is not a readable image
                within the pixel limit.
        """
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise CalibrationDataError(
                "Reading image folders needs Pillow, which is not installed.",
                hint="pip install 'qconvert[images]'.",
            ) from None
        limit = self.limits.max_image_pixels
        # Pillow's own decompression-bomb guard stays on, at our limit: it refuses images of
        # over twice the limit as it opens them; the header check below takes the rest.
        Image.MAX_IMAGE_PIXELS = limit
        try:
            with Image.open(path) as opened:  # reads the header only
                width, height = opened.size
                if width * height > limit:
                    raise _too_many_pixels(path, f"{width}x{height} pixels", limit)
                image = opened.convert("L" if self.channels == 1 else "RGB")
                image.load()
        except Image.DecompressionBombError:
            raise _too_many_pixels(path, f"over {2 * limit:,} pixels", limit) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise CalibrationDataError(
                f"Image '{path}' could not be read: {str(exc).splitlines()[0]}"
            ) from None
        image = self._resized(image, Image)
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, np.newaxis]
        if self.preprocessing.color == "BGR":
            pixels = pixels[:, :, ::-1]
        if self.spec.dtype == np.uint8:
            array = pixels.astype(np.uint8)  # a model that takes raw pixels
        else:
            p = self.preprocessing
            mean = np.asarray(p.mean, dtype=np.float32)
            std = np.asarray(p.std, dtype=np.float32)
            array = ((pixels * np.float32(p.scale) - mean) / std).astype(self.spec.dtype)
        if self.layout == "NCHW":
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array[np.newaxis])

    def _resized(self, image, pil):
        height, width = self.size
        resample = pil.Resampling.BILINEAR
        if not self.preprocessing.crop:
            return image.resize((width, height), resample)
        factor = max(height / image.height, width / image.width)
        scaled = image.resize(
            (
                max(width, round(image.width * factor)),
                max(height, round(image.height * factor)),
            ),
            resample,
        )
        left = (scaled.width - width) // 2
        top = (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
