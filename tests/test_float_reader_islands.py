"""A layer whose output a float layer reads computes in float too, as planned.

Conv -> Relu -> Conv -> Relu -> Conv -> Relu -> Conv, the third Conv left float (by
--exclude, or raised by the default recipe). The second Conv's output has only that float
reader, which reads the float tensor (onnxruntime would otherwise requantize a float Conv
that reads a DequantizeLinear). Quantized, the second Conv had no QuantizeLinear after
it, so onnxruntime ran it as a float FusedConv between layout reorders: an island the
plan did not mean. Now it is planned float from int8-stored weights, reading the
dequantized output of the first Conv, which stays an integer kernel.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import testing

C = 32
SAMPLES = 64


def _save_with_samples(
    nodes, inits, name: str, shape: list[int], tmp_path, samples: int = SAMPLES
):
    """Saves a one-input, one-output graph of `shape` with `samples` random samples."""
    graph = h.make_graph(
        nodes,
        name,
        [h.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(samples)]
    )
    return path


def _chain(tmp_path, *, layers: int = 4, size: int = 8, outlier: float = 1.0):
    """`layers` 3x3 Convs of C channels with a Relu between them, named conv1, conv2, ...

    `outlier` scales channel 0 of conv2's output (and divides conv3's weights on it, so
    the function stays the same): one channel that wide crushes the others on conv3's
    int8 input, which makes conv3 the node the recipe gains most by raising.
    """
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in range(1, layers + 1):
        last = i == layers
        weight = rng.standard_normal((C, C, 3, 3)) * np.sqrt(2.0 / (C * 9))
        bias = rng.standard_normal(C) * 0.1
        if i == 2:
            weight[0], bias[0] = weight[0] * outlier, abs(bias[0]) * outlier
        if i == 3:
            weight[:, 0] /= outlier
        inits += [
            nh.from_array(weight.astype(np.float32), f"w{i}"),
            nh.from_array(bias.astype(np.float32), f"b{i}"),
        ]
        conv_out = "output" if last else f"c{i}"
        nodes.append(
            h.make_node(
                "Conv", [x, f"w{i}", f"b{i}"], [conv_out], name=f"conv{i}", pads=[1] * 4
            )
        )
        if not last:
            nodes.append(h.make_node("Relu", [conv_out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    shape = [1, C, size, size]
    return _save_with_samples(nodes, inits, "chain", shape, tmp_path)


def _quantize(run_cli, tmp_path, path, *args):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = run_cli(
        "quantize", path, "--data", tmp_path / "calib", "-o", out, "--report", report,
        "--strict-kernels", "--force", *args,
    )  # fmt: skip
    return result, out, json.loads(report.read_text())


def _nodes(report) -> dict[str, dict]:
    return {node["name"]: node for node in report["conversion"]["nodes"]}


def test_an_excluded_conv_leaves_no_unplanned_island(tmp_path, run_cli):
    path = _chain(tmp_path)
    result, out, report = _quantize(run_cli, tmp_path, path, "--recipe", "fast",
                                    "--exclude", "conv3")  # fmt: skip
    assert result.code == 0, result.err
    audit = report["conversion"]["fusion_audit"]
    assert audit["unplanned_islands"] == 0, audit
    nodes = _nodes(report)
    assert nodes["conv3"]["precision"] == nodes["conv2"]["precision"] == "float"
    assert nodes["conv1"]["precision"] == "int8"
    assert "a node left float reads its output" in nodes["conv2"]["reason"]
    # conv1 still runs on the integers; the float Convs keep their float kernels.
    assert audit["integer_kernels"] == {"QLinearConv": 1}, audit
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 1
    feeds = [testing.random_inputs(onnx.load(path), seed=100 + i) for i in range(8)]
    assert testing.output_sqnr(path, out, feeds) > 25.0


def test_a_conv_the_recipe_raises_leaves_no_unplanned_island(tmp_path, run_cli):
    path = _chain(tmp_path)
    # A floor no int8 plan reaches, and a budget for two Convs (each is a quarter of the
    # work): a Conv after another costs its own work and its producer's, which the plan
    # makes float with it, so at most one such raise fits.
    result, _, report = _quantize(run_cli, tmp_path, path, "--floor-sqnr", "60",
                                  "--raise-budget", "55")  # fmt: skip
    assert result.code == 0, result.err
    rows = report["conversion"]["recipe"]["raised"]
    raised = {node["name"] for node in rows}
    assert raised - {"conv1"}, raised
    for row in rows:
        if row["name"] != "conv1":
            number = int(row["name"][-1])
            assert f"conv{number - 1}" in row["made_float"], row
            assert abs(row["work_share"] - 0.5) < 0.01, row
    audit = report["conversion"]["fusion_audit"]
    assert audit["unplanned_islands"] == 0, audit
    assert audit["kernel_count"] >= 1, audit
    nodes = _nodes(report)
    assert all(nodes[name]["precision"] == "float" for name in raised)


def _residual(tmp_path):
    """conv1 -> relu -> conv2; add = conv2 + relu; conv3(add) + conv4(add) -> output."""
    rng = np.random.default_rng(1)
    names = ("conv1", "conv2", "conv3", "conv4")
    inits = [
        nh.from_array(
            (rng.standard_normal((C, C, 3, 3)) * np.sqrt(2.0 / (C * 9))).astype(np.float32),
            f"{name}_w",
        )
        for name in names
    ]

    def conv(name, x, out):
        return h.make_node("Conv", [x, f"{name}_w"], [out], name=name, pads=[1] * 4)

    nodes = [
        conv("conv1", "input", "c1"),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        conv("conv2", "r1", "c2"),
        h.make_node("Add", ["c2", "r1"], ["sum"], name="add"),
        conv("conv3", "sum", "c3"),
        conv("conv4", "sum", "c4"),
        h.make_node("Add", ["c3", "c4"], ["output"], name="out"),
    ]
    shape = [1, C, 8, 8]
    return _save_with_samples(nodes, inits, "residual", shape, tmp_path)


def test_an_add_read_by_an_excluded_conv_beside_a_quantized_one_is_planned_float(
    tmp_path, run_cli
):
    # The Add's output goes to conv3's QuantizeLinear and, in float, to the excluded conv4:
    # onnxruntime cannot fuse an Add that a float node reads, so it is planned float.
    path = _residual(tmp_path)
    result, out, report = _quantize(run_cli, tmp_path, path, "--recipe", "fast",
                                    "--exclude", "conv4")  # fmt: skip
    assert result.code == 0, result.err
    audit = report["conversion"]["fusion_audit"]
    assert audit["unplanned_islands"] == 0, audit
    nodes = _nodes(report)
    assert nodes["add"]["precision"] == "float"
    assert "a node left float reads its output" in nodes["add"]["reason"]
    assert nodes["conv3"]["precision"] == "int8"
    assert audit["integer_kernels"].get("QLinearConv", 0) >= 1, audit
    feeds = [testing.random_inputs(onnx.load(path), seed=100 + i) for i in range(8)]
    assert testing.output_sqnr(path, out, feeds) > 25.0


def _excluded_add(tmp_path, *, then: str):
    """conv1 -> relu1 -> conv2; add = conv2 + relu1 (the node to exclude), then `then`:
    a HardSwish (float: no integer kernel) before conv3, or conv3 directly."""
    rng = np.random.default_rng(2)
    inits = [
        nh.from_array(
            (rng.standard_normal((C, C, 3, 3)) * np.sqrt(2.0 / (C * 9))).astype(np.float32),
            f"w{i}",
        )
        for i in (1, 2, 3)
    ]

    def conv(i, x, out):
        return h.make_node("Conv", [x, f"w{i}"], [out], name=f"conv{i}", pads=[1] * 4)

    nodes = [
        conv(1, "input", "c1"),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        conv(2, "r1", "c2"),
        h.make_node("Add", ["c2", "r1"], ["sum"], name="add"),
    ]
    if then == "hardswish":
        nodes.append(h.make_node("HardSwish", ["sum"], ["act"], name="hswish"))
        nodes.append(conv(3, "act", "output"))
    else:
        nodes.append(conv(3, "sum", "output"))
    return _save_with_samples(nodes, inits, "excluded_add", [1, C, 8, 8], tmp_path)


def test_an_excluded_add_before_a_float_op_leaves_its_producers_integer(tmp_path, run_cli):
    # Nothing quantizes the Add's output, so onnxruntime cannot fuse it: it reads the
    # dequantized outputs of conv2 and relu1, and both Convs keep their integer kernels.
    path = _excluded_add(tmp_path, then="hardswish")
    result, out, report = _quantize(run_cli, tmp_path, path, "--recipe", "fast",
                                    "--exclude", "add")  # fmt: skip
    assert result.code == 0, result.err
    nodes = _nodes(report)
    assert nodes["add"]["precision"] == "float"
    assert nodes["conv1"]["precision"] == nodes["conv2"]["precision"] == "int8"
    audit = report["conversion"]["fusion_audit"]
    assert audit["unplanned_islands"] == 0, audit
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QLinearConv"] == 2, optimized
    assert optimized["Add"] == 1 and "QLinearAdd" not in optimized, optimized
    feeds = [testing.random_inputs(onnx.load(path), seed=100 + i) for i in range(8)]
    assert testing.output_sqnr(path, out, feeds) > 25.0


def test_an_excluded_add_before_a_quantized_conv_stays_float(tmp_path, run_cli):
    # conv3 quantizes the Add's output: an Add reading DequantizeLinear nodes would become
    # a QLinearAdd, the exclusion lost. It reads the float tensors, so its producers
    # compute in float too.
    path = _excluded_add(tmp_path, then="conv")
    result, out, report = _quantize(run_cli, tmp_path, path, "--recipe", "fast",
                                    "--exclude", "add")  # fmt: skip
    assert result.code == 0, result.err
    nodes = _nodes(report)
    assert nodes["add"]["precision"] == "float"
    assert nodes["conv2"]["precision"] == "float"
    # onnxruntime adds it inside the float conv2 (a Conv with a sum input), in float.
    optimized = testing.optimized_ops(out, tmp_path)
    assert "QLinearAdd" not in optimized and optimized["Conv"] == 3, optimized
    assert report["conversion"]["fusion_audit"]["unplanned_islands"] == 0
