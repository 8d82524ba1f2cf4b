"""`qconvert compare` on the bundled sample models: accuracy, per-layer, the HTML report in a
real browser.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES

import qconvert
from qconvert import model as model_io
from qconvert.calibration import calibrate_tensors, tensors_to_calibrate
from qconvert.dataset import DirectorySource, input_specs
from qconvert.passes import DropIntermediateShapesPass, InsertQDQPass, prepare
from qconvert.plan import make_plan
from qconvert.runtime import make_session
from qconvert.schemes import SCHEMES

DWSEP = SAMPLES / "digits_dwsep"


@pytest.fixture(scope="module")
def dwsep_int8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dwsep") / "model.int8.onnx"
    # the single pass: the per-layer figures below are those of the plain int8 model
    qconvert.quantize(DWSEP / "model.onnx", out, data=DWSEP / "calib", recipe="fast")
    return out


@pytest.fixture(scope="module")
def per_layer_report(dwsep_int8, tmp_path_factory) -> tuple[dict, Path]:
    """One compare run with --per-layer, written as JSON and HTML."""
    folder = tmp_path_factory.mktemp("reports")
    report = qconvert.compare(
        DWSEP / "model.onnx",
        dwsep_int8,
        data=DWSEP / "eval",
        per_layer=True,
        report=folder / "report.html",
    )
    report.write(folder / "report.json")
    return json.loads((folder / "report.json").read_text()), folder / "report.html"


def test_float_vs_int8_accuracy_and_drop_match_an_independent_count(run_cli, dwsep_int8):
    result = run_cli(
        "compare", DWSEP / "model.onnx", dwsep_int8, "--data", DWSEP / "eval", "--json"
    )
    assert result.code == 0, result.err
    comparison = json.loads(result.out)["comparison"]
    labels = np.load(DWSEP / "eval" / "labels.npy")
    files = sorted((DWSEP / "eval").glob("s*.npy"))
    accuracy = []
    for model in (DWSEP / "model.onnx", dwsep_int8):
        session = make_session(str(model))
        predictions = [
            int(np.argmax(session.run(None, {"input": np.load(f)[None]})[0])) for f in files
        ]
        accuracy.append(float(np.mean(np.array(predictions) == labels)))
    assert comparison["samples"] == 500
    assert comparison["reference_accuracy"] == pytest.approx(accuracy[0])
    assert comparison["candidate_accuracy"] == pytest.approx(accuracy[1])
    assert comparison["accuracy_drop_points"] == pytest.approx(
        100 * (accuracy[0] - accuracy[1])
    )
    assert accuracy[0] > 0.95  # a trained model, not noise


def test_per_layer_names_the_worst_layer_and_excluding_it_improves_sqnr(
    per_layer_report, dwsep_int8, tmp_path
):
    report, _ = per_layer_report
    layers = report["comparison"]["layers"]
    worst = layers[0]
    # A layer computed exactly (a float Flatten of a float tensor) reads "inf".
    finite = [layer["local_sqnr_db"] for layer in layers if layer["local_sqnr_db"] != "inf"]
    assert worst["local_sqnr_db"] == min(finite)
    convs = {node.name: node for node in onnx.load_model(str(DWSEP / "model.onnx")).graph.node}
    assert worst["op_type"] == "Conv" and worst["node"] in convs
    # Depthwise convolutions (one group per channel) are the classic weak spot of int8.
    group = next(a.i for a in convs[worst["node"]].attribute if a.name == "group")
    assert group > 1, worst
    # fc, a classifier head after global pooling, computes in float: not compared.
    assert {layer["node"] for layer in layers} >= {"stem_conv", worst["node"]}

    excluded = tmp_path / "excluded.int8.onnx"
    model_io.write_atomically(excluded, _quantize_leaving_float(worst["node"]))
    before = qconvert.compare(DWSEP / "model.onnx", dwsep_int8, data=DWSEP / "eval")
    after = qconvert.compare(DWSEP / "model.onnx", excluded, data=DWSEP / "eval")
    sqnr_before = before.comparison.outputs[0].sqnr_db
    sqnr_after = after.comparison.outputs[0].sqnr_db
    assert sqnr_after > sqnr_before, (worst["node"], sqnr_before, sqnr_after)


def test_html_report_opens_in_chromium_and_shows_the_chart(per_layer_report, tmp_path):
    _, html = per_layer_report
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(
            "chromium is not installed: run `make test-setup` (Debian package chromium)"
        )
    text = html.read_text()
    assert text.count("<svg") == 2  # size bars, per-layer SQNR (no latency asked)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<svg" in dom.stdout and "block1_dw_conv" in dom.stdout
    assert dom.stdout.count("<rect") >= 2 * 12  # two bars per layer
    console = [
        line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
    ]
    assert console == []
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1000,1400", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    width, height, pixels = _read_png(shot)
    assert (width, height) == (1000, 1400)
    colours = {tuple(pixel) for pixel in pixels.reshape(-1, pixels.shape[-1])[:, :3]}
    non_white = int(np.sum(np.any(pixels[..., :3] < 240, axis=-1)))
    assert len(colours) > 50, len(colours)
    assert non_white > 0.05 * width * height, non_white
    # The chart's two bar colours are drawn, over many pixels each.
    for colour in ((0x4C, 0x78, 0xA8), (0xF5, 0x85, 0x18)):
        assert int(np.sum(np.all(pixels[..., :3] == colour, axis=-1))) > 2000, colour


def _quantize_leaving_float(node_name: str) -> bytes:
    """digits_dwsep in int8 with `node_name` left float.

    The plan leaves the node float. onnxruntime, though, quantizes the float weights of a Conv
    that reads a DequantizeLinear output itself (its WeightBiasQuantization optimizer, per
    tensor), which would undo the exclusion. So the node reads a Clip of that output instead:
    the same values (the folded ReLU6), not a DequantizeLinear output.
    """
    float_model = model_io.load_model(DWSEP / "model.onnx")
    scheme = SCHEMES["int8"]
    source = DirectorySource(DWSEP / "calib", input_specs(float_model))
    prepared = prepare(float_model, min_opset=scheme.min_opset)
    ranges = calibrate_tensors(prepared, source, tensors_to_calibrate(prepared))
    plan = make_plan(prepared, scheme, ranges, excluded=frozenset({node_name}))
    assert node_name in {node.name for node in plan.float_nodes()}
    quantized = InsertQDQPass(plan=plan)(prepared).model
    DropIntermediateShapesPass()(quantized)
    proto = onnx.load_model_from_string(model_io.to_bytes(quantized))
    folded = {fold.output: fold for fold in plan.folds}
    clamps = {
        node.name: node for node in onnx.load_model(str(DWSEP / "model.onnx")).graph.node
    }
    nodes = list(proto.graph.node)
    producers = {output: node for node in nodes for output in node.output}
    target = next(node for node in nodes if node.name == node_name)
    for index, name in enumerate(target.input):
        producer = producers.get(name)
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        tensor = name.removesuffix("_dequantized")
        if tensor in folded:
            clamp = clamps[folded[tensor].nodes[-1]]
            clip = onnx.helper.make_node(
                "Clip", [name, *clamp.input[1:]], [f"{tensor}_float"], name=f"{tensor}_float"
            )
            target.input[index] = clip.output[0]
            proto.graph.node.insert(nodes.index(target), clip)
            nodes = list(proto.graph.node)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _read_png(path: Path) -> tuple[int, int, np.ndarray]:
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
