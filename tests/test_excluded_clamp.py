"""An excluded Relu or Clip stays float, and the fusion audit sees an exclusion lost.

onnxruntime drops a Relu (or a Clip inside the quantized range) that a QuantizeLinear
reads into that QuantizeLinear, or into the integer kernel before it: an excluded clamp
whose readers quantize its output would run on the integers after all, and the Conv the
plan kept float before it as a QLinearConv. The plan now has the clamp's readers read its
float output; the audit reports any node planned float that onnxruntime ran as integers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper as nh
from test_float_reader_islands import _chain, _nodes, _quantize

from qconvert import formatting, testing
from qconvert.fusion_audit import audit_model
from qconvert.plan import NodeDecision, QuantPlan
from qconvert.schemes import INT8

QDQ_CONV_RELU = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (uint8[1,4,8,8] x) => (float[1,4,8,8] output) {
        xf = DequantizeLinear (x, s, z)
        w = DequantizeLinear (wq, ws, wz)
        c = Conv <pads = [1,1,1,1]> (xf, w)
        r = Relu (c)
        q = QuantizeLinear (r, s, z)
        output = DequantizeLinear (q, s, z)
    }
"""


def _qdq_conv_relu() -> bytes:
    model = onnx.parser.parse_model(QDQ_CONV_RELU)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            nh.from_array(np.float32(0.05), "s"),
            nh.from_array(np.uint8(0), "z"),
            nh.from_array(rng.integers(-60, 60, (4, 4, 3, 3)).astype(np.int8), "wq"),
            nh.from_array(np.float32(0.01), "ws"),
            nh.from_array(np.int8(0), "wz"),
        ]
    )
    for node in model.graph.node:
        node.name = {"Conv": "conv", "Relu": "relu"}.get(node.op_type, node.output[0])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def test_audit_reports_float_nodes_onnxruntime_ran_as_integers():
    plan = QuantPlan(
        scheme=INT8,
        tensors={},
        nodes=(
            NodeDecision("conv", "Conv", False, "kept float"),
            NodeDecision("relu", "Relu", False, "excluded by --exclude 'relu'"),
        ),
        folds=(),
    )
    audit = audit_model(_qdq_conv_relu(), plan)
    lost = {node.name: node.ran_as for node in audit.lost}
    assert lost == {"conv": "QLinearConv", "relu": "dropped"}, audit
    assert audit.integer_kernels == {"QLinearConv": 1}
    assert audit.to_dict()["lost_float"][0]["ran_as"] == "QLinearConv"
    rows = formatting.island_rows(audit)
    assert ["relu", "Relu", "planned float, ran as dropped"] == rows[-1][:3]
    assert "2 planned float, ran as integers" in formatting.islands(audit)
    # Planned quantized, the same graph has nothing lost.
    quantized = QuantPlan(
        scheme=INT8,
        tensors={},
        nodes=(NodeDecision("conv", "Conv", True, "quantized"),),
        folds=(),
    )
    assert audit_model(_qdq_conv_relu(), quantized).lost == ()


def test_an_excluded_relu_read_by_a_quantized_conv_stays_float(tmp_path, run_cli):
    path = _chain(tmp_path)
    result, out, report = _quantize(run_cli, tmp_path, path, "--recipe", "fast",
                                    "--exclude", "relu2")  # fmt: skip
    # Before, relu2 went into a QuantizeLinear, and conv2 ran as a QLinearConv while the
    # plan said float.
    assert result.code == 0, result.err
    audit = report["conversion"]["fusion_audit"]
    assert audit["lost_float"] == [] and audit["unplanned_islands"] == 0, audit
    nodes = _nodes(report)
    assert nodes["relu2"]["precision"] == "float"
    assert nodes["conv3"]["precision"] == "float"
    assert "excluded Relu 'relu2'" in nodes["conv3"]["reason"]
    # The Conv before it keeps its integer kernel: relu2 reads its DequantizeLinear.
    assert all(nodes[n]["precision"] == "int8" for n in ("conv1", "conv2", "conv4"))
    optimized = testing.optimized_model(out, tmp_path)
    ran = {node.name: node.op_type for node in optimized.graph.node}
    assert ran.get("relu2") == "Relu", ran  # a float Relu, not folded away
    assert sum(op == "QLinearConv" for op in ran.values()) == 3 - 1, ran
    feeds = [testing.random_inputs(onnx.load(path), seed=100 + i) for i in range(8)]
    assert testing.output_sqnr(path, out, feeds) > 25.0


def test_an_excluded_clip_before_a_conv_keeps_no_quantize_after_it(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    c = 16
    w1 = rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (c * 9))
    w2 = rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (c * 9))
    model = testing.conv_relu_conv(w1, 0.1 * rng.standard_normal(c), w2, clip=True)
    model.graph.node[1].name = "clip"
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(16)]
    )
    result, out, report = _quantize(run_cli, tmp_path, path, "--recipe", "fast",
                                    "--exclude", "clip")  # fmt: skip
    assert result.code == 0, result.err
    assert report["conversion"]["fusion_audit"]["lost_float"] == []
    written = onnx.load(out)
    clip = next(node for node in written.graph.node if node.op_type == "Clip")
    readers = [n.op_type for n in written.graph.node if clip.output[0] in n.input]
    assert readers == ["Conv"], readers  # no QuantizeLinear to drop the Clip into
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["Clip"] == 1 and optimized["QLinearConv"] == 1, optimized
    feeds = [testing.random_inputs(model, seed=100 + i) for i in range(4)]
    assert testing.output_sqnr(path, out, feeds) > 30.0
