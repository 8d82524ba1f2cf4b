"""Images with text in them, for the text detector (PP-OCR's DBNet): its probability map is
only worth comparing where the float model finds text.

- `rendered_page`: lines of real prose drawn in code (Pillow's default font, sizes 12 to 34
  px, dark ink, a slight rotation) over a photo crop washed toward a paper tone: the
  calibration images.
- `scanned_view`: a crop of a scanned text image, rescaled, rotated by up to 15 degrees and
  placed on a canvas of the scan's own background tone: the evaluation images.

Both return HxWx3 uint8 RGB at a fixed side (a multiple of 32, as the detector's resize
gives it), so every sample has the same shape (Quark's AdaRound needs that).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench import data

# PaddleOCR's detector preprocessing (NormalizeImage in its det config): /255, then the
# ImageNet mean and std per channel.
DET_MEAN = data.IMAGENET_MEAN.reshape(3)
DET_STD = data.IMAGENET_STD.reshape(3)


def detector_input(image: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 image as the detector's [1, 3, H, W] float input."""
    if image.shape[0] % 32 or image.shape[1] % 32:
        raise ValueError(f"detector input {image.shape[:2]} is not a multiple of 32")
    return data.to_nchw(image, DET_MEAN, DET_STD)


def rendered_page(
    lines: Sequence[str],
    backgrounds: Sequence[np.ndarray],
    rng: np.random.Generator,
    side: int = 320,
) -> np.ndarray:
    """Lines of `lines` drawn top to bottom over a background (a photo crop when
    `backgrounds` has any, else paper), then rotated together."""
    from PIL import Image, ImageDraw, ImageFont

    paper = rng.uniform(180, 255, 3)
    if backgrounds:
        photo = backgrounds[int(rng.integers(len(backgrounds)))]
        crop = data.resize(next(data.crops(photo, 1, rng)), side, side)
        mix = rng.uniform(0.0, 0.8)  # how much of the photo shows through the paper
        back = mix * crop.astype(np.float32) + (1 - mix) * paper
    else:
        back = np.broadcast_to(paper, (side, side, 3))
    canvas = Image.fromarray(np.asarray(back, np.float32).astype(np.uint8))
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    top = int(rng.integers(0, 20))
    while top < side - 12:
        size = int(rng.integers(12, 35))
        text = lines[int(rng.integers(len(lines)))][: int(rng.integers(8, 60))]
        font = ImageFont.load_default(size=size)
        draw.text((int(rng.integers(-20, side // 3)), top), text, fill=255, font=font)
        top += int(size * rng.uniform(1.3, 2.6))
    mask = mask.rotate(float(rng.uniform(-12, 12)), Image.BILINEAR)
    ink = tuple(int(v) for v in rng.uniform(0, 90, 3))
    canvas.paste(Image.new("RGB", (side, side), ink), (0, 0), mask)
    return np.asarray(canvas)


def scanned_view(image: np.ndarray, rng: np.random.Generator, side: int = 320) -> np.ndarray:
    """A crop of half to all of each side of `image`, scaled to 70-100% of the canvas,
    rotated by up to 15 degrees, on a canvas of the crop's median tone."""
    from PIL import Image

    height, width = image.shape[:2]
    crop_h = int(height * rng.uniform(0.5, 1.0))
    crop_w = int(width * rng.uniform(0.5, 1.0))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    crop = image[top : top + crop_h, left : left + crop_w]
    scale = min(side / crop_h, side / crop_w) * rng.uniform(0.7, 1.0)
    size = (max(1, int(crop_w * scale)), max(1, int(crop_h * scale)))
    tone = tuple(int(v) for v in np.median(crop.reshape(-1, 3), axis=0))
    view = Image.fromarray(crop).resize(size, Image.BILINEAR)
    view = view.rotate(
        float(rng.uniform(-15, 15)), Image.BILINEAR, expand=True, fillcolor=tone
    )
    view = view.crop((0, 0, min(side, view.width), min(side, view.height)))
    canvas = Image.new("RGB", (side, side), tone)
    canvas.paste(
        view,
        (
            int(rng.integers(0, side - view.width + 1)),
            int(rng.integers(0, side - view.height + 1)),
        ),
    )
    return np.asarray(canvas)
