"""The terminal groups the nodes left float by op and reason; the report files list each."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qconvert import formatting, testing
from qconvert.report import FloatNode


def _matmul_then_relus(relus: int) -> onnx.ModelProto:
    """x -> MatMul (a 64x32 weight, int4-quantizable) -> `relus` Relus in a row."""
    weight = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"], name="matmul")]
    for i in range(relus):
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"h{i + 1}"], name=f"relu{i}"))
    graph = helper.make_graph(
        nodes,
        "relus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info(f"h{relus}", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_groups_count_nodes_by_op_and_reason_and_name_the_first_few():
    nodes = [FloatNode(f"reshape{i}", "Reshape", "no weight") for i in range(5)]
    nodes.insert(2, FloatNode("softmax", "Softmax", "kept float"))
    rows = formatting.float_node_groups(nodes)
    assert rows == [
        ["reshape0, reshape1, reshape2 and 2 more", "Reshape x5", "no weight"],
        ["softmax", "Softmax x1", "kept float"],
    ]


def test_quantize_prints_one_row_for_many_alike_float_nodes(run_cli, tmp_path):
    model = testing.save(_matmul_then_relus(12), tmp_path / "model.onnx")
    report = tmp_path / "report.json"
    result = run_cli(
        "quantize", model, "--scheme", "int4", "-o", tmp_path / "q.onnx", "--report", report
    )
    assert result.code == 0, result.err
    relu_rows = [line for line in result.out.splitlines() if "Relu x12" in line]
    assert len(relu_rows) == 1
    assert "relu3" not in result.out  # the fourth and later are counted, not named
    listed = json.loads(report.read_text())["conversion"]["float_nodes"]
    assert sorted(node["name"] for node in listed) == sorted(f"relu{i}" for i in range(12))
