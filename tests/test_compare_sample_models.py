"""`qconvert compare` on the bundled sample models: accuracy, per-layer, the HTML report in a
real browser.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import browser
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
    report, html = per_layer_report
    text = html.read_text()
    assert text.count("<svg") == 2  # size bars, per-layer SQNR line (no latency asked)
    dom, log, _ = browser.dump_dom(html, tmp_path / "profile")
    assert "<svg" in dom and "block1_dw_conv" in dom
    layers = report["comparison"]["layers"]
    # One line per series, a point per layer with finite SQNR, in graph order.
    lines = re.findall(r'<polyline points="([^"]+)"', dom)
    assert len(lines) == 2
    finite = [layer for layer in layers if layer["local_sqnr_db"] not in ("inf", None)]
    assert len(lines[0].split()) == len(finite)
    xs = [float(point.split(",")[0]) for point in lines[0].split()]
    assert xs == sorted(xs)
    # The worst ten are marked, numbered, and named in the table below the chart.
    assert dom.count('r="5" fill="#cf222e"') == min(10, len(layers))
    assert f"<td>{layers[0]['node']}</td>" in dom
    assert browser.console_lines(log) == []
    pixels = browser.screenshot(html, tmp_path / "profile", (1000, 1400))
    colours = {tuple(pixel) for pixel in pixels.reshape(-1, pixels.shape[-1])[:, :3]}
    non_white = int(np.sum(np.any(pixels[..., :3] < 240, axis=-1)))
    assert len(colours) > 50, len(colours)
    assert non_white > 0.03 * pixels.shape[0] * pixels.shape[1], non_white
    # The two series' colours are drawn (bars and lines), over many pixels each.
    for colour in ((0x4C, 0x78, 0xA8), (0xF5, 0x85, 0x18)):
        assert int(np.sum(np.all(pixels[..., :3] == colour, axis=-1))) > 500, colour


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
