"""Constant scale-and-shift layers (x * c + d) move into the Convs around them.

PP-OCRv4's DBNet writes one after most Convs and after every HardSwish; left in place each
is two float passes between a DequantizeLinear and a QuantizeLinear. The folds are checked
on the float model (same numbers up to float rounding), then through `quantize`: no Mul
is left, the outputs stay within int8 rounding, and the fusion audit finds no unplanned
island (HardSwish as onnxruntime expands it included).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import testing
from qconvert.fusion_audit import audit_graph
from qconvert.passes.prepare import prepare
from qconvert.runtime import make_session

C = 32
SHAPE = [1, C, 16, 16]


def _block(*, extra_reader: bool = False) -> onnx.ModelProto:
    """Conv -> Mul/Add (per channel) -> HardSwish -> Mul/Add (scalar) -> padded depthwise
    Conv and unpadded pointwise Conv, summed. `extra_reader`: a Relu also reads the
    scalar affine's output, so it cannot move."""
    rng = np.random.default_rng(0)
    inits = {
        "w0": rng.standard_normal((C, C, 3, 3)) * 0.3,
        "b0": rng.standard_normal(C) * 0.1,
        "c0": rng.uniform(-1.5, 1.5, (1, C, 1, 1)),
        "d0": rng.standard_normal((1, C, 1, 1)),
        "cs": np.array([0.7]),
        "ds": np.array([-0.4]),
        "w1": rng.standard_normal((C, 1, 3, 3)) * 0.3,
        "b1": rng.standard_normal(C) * 0.1,
        "w2": rng.standard_normal((C, C, 1, 1)) * 0.3,
    }
    nodes = [
        h.make_node("Conv", ["input", "w0", "b0"], ["y0"], pads=[1, 1, 1, 1]),
        h.make_node("Mul", ["y0", "c0"], ["m0"]),
        h.make_node("Add", ["m0", "d0"], ["a0"]),
        h.make_node("HardSwish", ["a0"], ["hs"]),
        h.make_node("Mul", ["cs", "hs"], ["m1"]),
        h.make_node("Add", ["m1", "ds"], ["a1"]),
        h.make_node("Conv", ["a1", "w1", "b1"], ["dw"], pads=[1, 1, 1, 1], group=C),
        h.make_node("Conv", ["a1", "w2"], ["pw"]),
        h.make_node("Add", ["dw", "pw"], ["sum"]),
    ]
    if extra_reader:
        nodes += [
            h.make_node("Relu", ["a1"], ["r"]),
            h.make_node("Add", ["sum", "r"], ["output"]),
        ]
    else:
        nodes.append(h.make_node("Identity", ["sum"], ["output"]))
    graph = h.make_graph(
        nodes,
        "affine",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, SHAPE)],
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    return ir.serde.serialize_model(prepare(ir.serde.deserialize_model(model), min_opset=17))


def _run(model: onnx.ModelProto | str, feeds: dict) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    return make_session(source).run(None, feeds)[0]


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal(SHAPE).astype(np.float32)}


def test_both_affine_layers_fold_into_the_convs_with_the_same_outputs():
    model = _block()
    folded = _prepared(model)
    ops = testing.count_ops(folded)
    # The Conv's scale and shift are its weights and bias; the HardSwish's pair moves into
    # the pointwise Conv whole, and into the padded depthwise Conv as one Add of d / c.
    assert ops["Mul"] == 0
    assert ops["Add"] == 2
    hardswish = next(n for n in folded.graph.node if n.op_type == "HardSwish")
    readers = {n.op_type for n in folded.graph.node if hardswish.output[0] in n.input}
    assert readers == {"Add", "Conv"}
    for seed in range(3):
        feeds = _feeds(seed)
        np.testing.assert_allclose(_run(folded, feeds), _run(model, feeds), rtol=0, atol=2e-5)


def test_an_affine_layer_another_op_reads_stays():
    model = _block(extra_reader=True)
    folded = _prepared(model)
    # The Conv's own scale and shift still fold; the HardSwish's pair is read by a Relu.
    assert testing.count_ops(folded)["Mul"] == 1
    feeds = _feeds(0)
    np.testing.assert_allclose(_run(folded, feeds), _run(model, feeds), rtol=0, atol=2e-5)


def test_quantized_the_affine_layers_cost_no_float_pass(tmp_path, run_cli):
    model = _block()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(16)]
    )
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = run_cli(
        "quantize", path, "--data", tmp_path / "calib", "-o", out, "--report", report,
        "--recipe", "fast", "--strict-kernels", "--force",
    )  # fmt: skip
    assert result.code == 0, result.err
    # The Muls left scale weights or bias scales: none reads a value the input flows to.
    written = onnx.load(out).graph
    flowing = {"input"}
    for node in written.node:
        if flowing & set(node.input):
            flowing.update(node.output)
    assert not any(flowing & set(n.input) for n in written.node if n.op_type == "Mul")
    assert testing.count_ops(out)["DequantizeLinear"] > 3  # the Convs do run quantized
    audit = json.loads(report.read_text())["conversion"]["fusion_audit"]
    assert audit["unplanned_islands"] == 0
    feeds = [_feeds(100 + i) for i in range(4)]
    reference = np.concatenate([_run(model, f) for f in feeds])
    quantized = np.concatenate([_run(str(out), f) for f in feeds])
    error = np.mean((reference - quantized) ** 2)
    sqnr = 10 * np.log10(np.mean(reference**2) / error)
    assert sqnr > 25, f"SQNR {sqnr:.1f} dB"


def _expanded_hardswish(*, named: bool) -> onnx.GraphProto:
    """DQ -> HardSigmoid(1/6, 1/2) -> Mul -> Q, as onnxruntime expands a HardSwish
    (nameless nodes), or as a model's own named nodes would read."""
    scale = nh.from_array(np.array(0.1, np.float32), "s")
    zero = nh.from_array(np.array(128, np.uint8), "z")
    nodes = [
        h.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], name="dq"),
        h.make_node(
            "HardSigmoid", ["x"], ["g"], alpha=1 / 6, beta=0.5, name="gate" if named else ""
        ),
        h.make_node("Mul", ["x", "g"], ["_token_1"], name="mul" if named else ""),
        h.make_node("QuantizeLinear", ["_token_1", "s", "z"], ["yq"], name="q"),
    ]
    return h.make_graph(
        nodes,
        "expanded",
        [h.make_tensor_value_info("xq", TensorProto.UINT8, [4])],
        [h.make_tensor_value_info("yq", TensorProto.UINT8, [4])],
        [scale, zero],
    )


def test_the_audit_knows_onnxruntimes_hardswish_body_as_planned():
    (island,) = audit_graph(_expanded_hardswish(named=False)).islands
    assert island.planned
    assert [node.op_type for node in island.nodes] == ["HardSigmoid", "Mul"]
    # Named nodes are the model's own: the audit needs the plan's word on them.
    (island,) = audit_graph(_expanded_hardswish(named=True)).islands
    assert not island.planned
