"""The fusion audit: integer kernels and float islands in onnxruntime's optimized graph.

Graphs are written by hand with islands on purpose (a float op between a DequantizeLinear
and a QuantizeLinear), then audited as onnxruntime's CPU provider optimizes them.
"""

from __future__ import annotations

import json
from xml.etree import ElementTree

import numpy as np
import onnx
import onnx_ir as ir

import qconvert
from qconvert import testing
from qconvert.fusion_audit import audit_model
from qconvert.passes import PadOnIntegersPass
from qconvert.plan import NodeDecision, QuantPlan
from qconvert.schemes import INT8

ISLAND = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,8] x) => (float[1,8] y) {
        s = Constant <value = float {0.05}> ()
        z = Constant <value = uint8 {128}> ()
        xq = QuantizeLinear (x, s, z)
        xd = DequantizeLinear (xq, s, z)
        sin = Sin (xd)
        cos = Cos (sin)
        cq = QuantizeLinear (cos, s, z)
        cd = DequantizeLinear (cq, s, z)
        yq = QuantizeLinear (cd, s, z)
        rd = DequantizeLinear (yq, s, z)
        y = Relu (rd)
    }
"""


def _island_model() -> bytes:
    model = onnx.parser.parse_model(ISLAND)
    for index, node in enumerate(model.graph.node):
        node.name = node.output[0] if node.op_type in ("Sin", "Cos", "Relu") else f"n{index}"
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _plan(*decisions: NodeDecision) -> QuantPlan:
    return QuantPlan(scheme=INT8, tensors={}, nodes=decisions, folds=())


def test_island_found_with_its_nodes_and_unplanned_without_a_plan():
    audit = audit_model(_island_model())
    assert len(audit.islands) == 1
    assert [(n.name, n.op_type) for n in audit.islands[0].nodes] == [
        ("sin", "Sin"),
        ("cos", "Cos"),
    ]
    assert audit.islands_by_op() == {"Cos": 1, "Sin": 1}
    assert len(audit.unplanned) == 1
    # Relu reads a DequantizeLinear but writes a graph output: float tail, not an island.
    assert all(n.op_type != "Relu" for i in audit.islands for n in i.nodes)


def test_island_the_plan_left_float_is_planned():
    plan = _plan(
        NodeDecision("sin", "Sin", False, "no integer kernel: stays float"),
        NodeDecision("cos", "Cos", False, "no integer kernel: stays float"),
    )
    audit = audit_model(_island_model(), plan)
    assert audit.unplanned == ()
    assert audit.islands[0].nodes[0].reason == "no integer kernel: stays float"


def test_island_where_the_plan_expected_a_kernel_is_unplanned():
    plan = _plan(
        NodeDecision("sin", "Sin", False, "stays float"),
        NodeDecision("cos", "Cos", True, "passes quantized values through"),
    )
    audit = audit_model(_island_model(), plan)
    assert len(audit.unplanned) == 1
    cos = audit.islands[0].nodes[1]
    assert cos.planned is False and "left float" in cos.reason


def test_integer_kernels_are_counted(tiny_cnn, tmp_path):
    report = qconvert.quantize(tiny_cnn, tmp_path / "q.onnx", data=tmp_path / "calib")
    audit = report.conversion.fusion_audit
    assert audit.integer_kernels.get("QLinearConv") == 1
    assert audit.islands == ()
    assert audit.quantize_nodes >= 1


def _conv_transpose(tmp_path):
    """Conv -> ConvTranspose -> Conv: the op table quantizes ConvTranspose knowing it has
    no integer kernel on CPU, a planned island."""
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,8,8] input) => (float[1,4,9,9] output) {
            a = Conv <pads = [1,1,1,1]> (input, w1, b1)
            t = ConvTranspose (a, w2, b2)
            output = Conv (t, w3, b3)
        }
    """
    model = onnx.parser.parse_model(text)
    for name, shape in (("w1", (4, 4, 3, 3)), ("w2", (4, 4, 3, 3)), ("w3", (4, 4, 2, 2))):
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        )
        bias = "b" + name[1]
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(np.zeros(4, np.float32), bias)
        )
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    return path


def test_strict_kernels_passes_with_only_planned_islands(tmp_path, run_cli):
    model = _conv_transpose(tmp_path)
    report = tmp_path / "r.json"
    result = run_cli(
        "quantize", model, "--data", tmp_path / "calib", "-o", tmp_path / "q.onnx",
        "--strict-kernels", "--report", report,
    )  # fmt: skip
    assert result.code == 0, result.err
    written = json.loads(report.read_text())["conversion"]["fusion_audit"]
    assert written["islands_by_op"] == {"ConvTranspose": 1}
    assert written["unplanned_islands"] == 0
    assert "float islands" in result.out


def test_strict_kernels_exits_1_on_an_unplanned_island(tmp_path, run_cli, monkeypatch):
    from test_pad_fold import _inputs, _padded_chain

    # Without the integer Pad, onnxruntime leaves DQ -> Pad -> Q: a kernel the plan meant.
    monkeypatch.setattr(
        PadOnIntegersPass, "call", lambda self, m: ir.passes.PassResult(m, modified=False)
    )
    model = testing.save(_padded_chain("reflect"), tmp_path / "model.onnx")
    testing.write_samples(tmp_path / "calib", _inputs(seed=1, count=4))
    out = tmp_path / "q.onnx"
    args = ("quantize", model, "--data", tmp_path / "calib", "-o", out)
    assert run_cli(*args).code == 0  # without the flag the island is only reported
    junit = tmp_path / "gates.xml"
    result = run_cli(*args, "--force", "--strict-kernels", "--junit", junit)
    assert result.code == 1
    assert (
        "strict-kernels: measured 1 unplanned islands or lost float nodes, needs <= 0"
        in result.err
    )
    assert out.exists()  # the model is valid; the gate says it is slower than planned
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "1")
    case = suite.find("testcase")
    assert case.get("name") == "strict-kernels"
    assert "1 unplanned islands or lost float nodes" in case.find("failure").get("message")


def test_island_onnxruntime_rewrote_is_traced_to_the_plan_by_its_tensors(tmp_path):
    """A float HardSwish between two quantized Convs is a planned island, even though
    onnxruntime runs it as nameless HardSigmoid and Mul nodes (it has no HardSwish kernel
    at this opset): they write the tensor the HardSwish wrote."""
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,16,8,8] input) => (float[1,16,8,8] output) {
            a = Conv <pads = [1,1,1,1]> (input, w1, b1)
            s = HardSwish (a)
            output = Conv <pads = [1,1,1,1]> (s, w2, b2)
        }
    """
    model = onnx.parser.parse_model(text)
    for name in ("w1", "w2"):
        weight = (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(weight, name))
        bias = np.zeros(16, np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(bias, "b" + name[1]))
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    report = qconvert.quantize(path, tmp_path / "q.onnx", data=tmp_path / "calib")
    audit = report.conversion.fusion_audit
    assert len(audit.islands) == 1 and audit.unplanned == ()
    reasons = {node.reason for node in audit.islands[0].nodes}
    assert any("no integer kernel" in reason for reason in reasons), reasons
    assert audit.integer_kernels["QLinearConv"] >= 1


def test_every_rendering_shows_the_audit(tmp_path):
    report = qconvert.quantize(
        _conv_transpose(tmp_path), tmp_path / "q.onnx", data=tmp_path / "calib"
    )
    island = "| node_1 | ConvTranspose | planned | onnxruntime has no integer ConvTranspose"
    assert island in report.to_markdown()
    assert "| float islands | 1 (0 not planned): ConvTranspose x1 |" in report.to_markdown()
    assert "<td>integer kernels</td><td>QLinearConv x1 (1 in all)</td>" in report.to_html()
    assert report.to_dict()["conversion"]["fusion_audit"]["integer_kernels"] == {
        "QLinearConv": 1
    }
