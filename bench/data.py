"""Sample folders for the bench: synthetic inputs, image preprocessing, BERT tokenization.

Folders use the layout qconvert reads (one `.npy` per sample for single-input models, one
`.npz` keyed by input name otherwise, `labels.npy` for labels), and the peer's data reader
reads the very same files.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

Feeds = dict[str, np.ndarray]


def write_folder(
    folder: Path, samples: Sequence[Feeds], labels: Sequence[int] | None = None
) -> Path:
    """Writes samples (and labels) to `folder`, replacing what was there."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for index, feeds in enumerate(samples):
        if len(feeds) == 1:
            np.save(folder / f"{index:05d}.npy", next(iter(feeds.values())))
        else:
            np.savez(folder / f"{index:05d}.npz", **feeds)
    if labels is not None:
        np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    return folder


def read_folder(folder: Path, input_ranks: dict[str, int]) -> list[Feeds]:
    """The samples of a folder written by `write_folder` (or any qconvert data folder)."""
    return list(iter_folder(folder, input_ranks))


def read_labels(folder: Path) -> np.ndarray | None:
    path = Path(folder) / "labels.npy"
    return np.load(path, allow_pickle=False).reshape(-1) if path.exists() else None


# --- synthetic inputs -------------------------------------------------------------------

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def synthetic_images(count: int, size: int, seed: int) -> list[Feeds]:
    """Photo-like images: smooth colour fields plus texture, ImageNet-normalized."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        coarse = rng.uniform(0.0, 1.0, (1, 3, 7, 7)).astype(np.float32)
        reps = -(-size // 7)
        smooth = np.kron(coarse, np.ones((1, 1, reps, reps), np.float32))[..., :size, :size]
        image = np.clip(smooth + rng.normal(0.0, 0.08, smooth.shape), 0.0, 1.0)
        samples.append({"input": ((image - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)})
    return samples


def synthetic_sentences(
    count: int, seq_len: int, seed: int, vocab: int = 30522
) -> list[Feeds]:
    """Token ids with sentence-like lengths, [CLS]/[SEP] and padding, as a tokenizer writes."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        length = int(rng.integers(8, seq_len + 1))
        ids = np.zeros((1, seq_len), np.int64)
        ids[0, :length] = rng.integers(1996, vocab, length)
        ids[0, 0], ids[0, length - 1] = 101, 102
        mask = (ids != 0).astype(np.int64)
        samples.append(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )
    return samples


# --- images -----------------------------------------------------------------------------


def load_rgb(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (Pillow is part of the bench extra)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def crops(image: np.ndarray, count: int, rng: np.random.Generator, min_side: float = 0.5):
    """`count` random square-ish crops covering at least `min_side` of the short side."""
    height, width = image.shape[:2]
    for _ in range(count):
        side = int(min(height, width) * rng.uniform(min_side, 1.0))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        yield image[top : top + side, left : left + side]


def photo_crops(
    input_name: str,
    photos: Sequence[np.ndarray],
    count: int,
    seed: int,
    *,
    side: int,
    mean: float,
    std: float,
) -> list[Feeds]:
    """`count` random crops spread evenly over the photos, each resized to side x side and
    normalized, as one-input feeds."""
    rng = np.random.default_rng(seed)
    per_photo = -(-count // len(photos))
    out = [
        {input_name: to_nchw(resize(crop, side, side), mean, std)}
        for photo in photos
        for crop in crops(photo, per_photo, rng)
    ]
    return out[:count]


def to_nchw(
    image: np.ndarray, mean: float | np.ndarray, std: float | np.ndarray
) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(np.float32)


# --- text -------------------------------------------------------------------------------


def sentences(text: str, min_words: int = 5) -> list[str]:
    """Splits running text into sentences of at least `min_words` words."""
    flat = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+", flat)
    return [p.strip() for p in parts if len(p.split()) >= min_words]


class WordPieceTokenizer:
    """BERT's uncased tokenizer: lower-case, strip accents, split punctuation, WordPiece."""

    def __init__(self, vocab_file: Path) -> None:
        words = Path(vocab_file).read_text(encoding="utf-8").splitlines()
        self.vocab = {word: index for index, word in enumerate(words)}
        self.unknown = self.vocab["[UNK]"]

    def _basic(self, text: str) -> Iterable[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        word = ""
        for char in text:
            if char.isspace():
                if word:
                    yield word
                word = ""
            elif unicodedata.category(char).startswith("P") or (
                char.isascii() and not char.isalnum()
            ):
                if word:
                    yield word
                word = ""
                yield char
            else:
                word += char
        if word:
            yield word

    def _wordpiece(self, word: str) -> list[int]:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unknown]
            start = end
        return pieces

    def encode(self, text: str, seq_len: int) -> Feeds:
        ids = [101]
        for word in self._basic(text):
            ids.extend(self._wordpiece(word))
        ids = [*ids[: seq_len - 1], 102]
        array = np.zeros((1, seq_len), np.int64)
        array[0, : len(ids)] = ids
        mask = (array != 0).astype(np.int64)
        return {
            "input_ids": array,
            "attention_mask": mask,
            "token_type_ids": np.zeros_like(array),
        }


def iter_folder(folder: Path, input_ranks: dict[str, int]) -> Iterable[Feeds]:
    """Streams the samples of a folder, one file at a time."""
    for path in sorted(Path(folder).iterdir()):
        if path.name == "labels.npy" or path.suffix not in (".npy", ".npz"):
            continue
        if path.suffix == ".npy":
            feeds = {next(iter(input_ranks)): np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as archive:
                feeds = {name: archive[name] for name in archive.files}
        yield {
            name: value[None] if value.ndim == input_ranks[name] - 1 else value
            for name, value in feeds.items()
        }
