"""Headless Chromium for the HTML report tests (Debian's `chromium`, which `make test`
installs), and a PNG decoder for its screenshots.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Background services off, so that nothing but the page itself could touch the network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium() -> str:
    """The browser's path; skips the test where it is not installed."""
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not installed: run `make test-setup` (Debian package chromium)"
        )
    return CHROMIUM


def dump_dom(page: Path, profile: Path) -> tuple[str, str, float]:
    """The DOM after load, Chromium's log, and the seconds it took."""
    started = time.perf_counter()
    done = subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr, time.perf_counter() - started


def console_lines(log: str) -> list[str]:
    """The page's console messages (errors, refused loads) in Chromium's log."""
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def screenshot(page: Path, profile: Path, size: tuple[int, int]) -> np.ndarray:
    """The rendered page as an (height, width, channels) array."""
    shot = profile.parent / f"{page.stem}.png"
    done = subprocess.run(
        [
            chromium(),
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            f"--window-size={size[0]},{size[1]}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    width, height, pixels = read_png(shot)
    assert (width, height) == size
    return pixels


def read_png(path: Path) -> tuple[int, int, np.ndarray]:
    """Decodes an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks, header = 8, [], None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        offset += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    stride = width * channels
    rows = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8).reshape(
        height, stride + 1
    )
    image = np.zeros((height, stride), np.uint8)
    above = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:]
        if kind == 0:  # None
            current = line.copy()
        elif kind == 1:  # Sub: a running sum along each channel
            current = (
                (np.cumsum(line.reshape(width, channels).astype(np.int64), axis=0) & 0xFF)
                .astype(np.uint8)
                .reshape(-1)
            )
        elif kind == 2:  # Up
            current = line + above
        else:  # Average (3) and Paeth (4) depend on the decoded left neighbour
            current = _unfilter_left(kind, line, above, channels)
        image[y] = current
        above = current
    return width, height, image.reshape(height, width, channels)


def _unfilter_left(kind: int, line: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    raw, up = line.tolist(), above.tolist()
    out = [0] * len(raw)
    for i, value in enumerate(raw):
        left = out[i - bpp] if i >= bpp else 0
        if kind == 3:
            out[i] = (value + ((left + up[i]) >> 1)) & 0xFF
            continue
        upper_left = up[i - bpp] if i >= bpp else 0
        p = left + up[i] - upper_left
        pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upper_left)
        predictor = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else upper_left)
        out[i] = (value + predictor) & 0xFF
    return np.array(out, np.uint8)
