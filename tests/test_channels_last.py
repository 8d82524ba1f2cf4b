"""A Flatten of an NHWC integer map is read in onnxruntime's stored order.

On QDQ graphs built here (Conv -> MaxPool -> Flatten -> dense layer), the rewritten model
must give onnxruntime's outputs of the model as built, and its optimized graph must hold
one Transpose less. Maps float kernels write, 16-bit maps and weights another node reads
are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert.passes import FlattenChannelsLastPass
from qconvert.runtime import make_session

CHANNELS, SIDE, OUTPUTS = 4, 6, 5
FEATURES = CHANNELS * (SIDE // 2) ** 2


def _head(kind: str, rng: np.random.Generator) -> tuple[list, list]:
    """Nodes and initializers of the dense layer reading `flat_dq` and writing `y`."""
    weight = rng.integers(-127, 128, (OUTPUTS, FEATURES)).astype(np.int8)
    if kind == "gemm_per_row":  # the layout qconvert writes: per output row, transB
        scale = rng.uniform(0.001, 0.01, OUTPUTS).astype(np.float32)
        nodes = [
            h.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
            h.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], axis=0),
            h.make_node("Gemm", ["flat_dq", "w", "b"], ["y"], transB=1),
        ]
        inits = [
            nh.from_array(weight, "w_q"),
            nh.from_array(scale, "w_s"),
            nh.from_array(np.zeros(OUTPUTS, np.int8), "w_z"),
            nh.from_array(rng.integers(-500, 500, OUTPUTS).astype(np.int32), "b_q"),
            nh.from_array((scale * np.float32(0.05)).astype(np.float32), "b_s"),
        ]
    elif kind == "gemm_per_input":  # scales along the input axis must move with it
        scale = rng.uniform(0.001, 0.01, FEATURES).astype(np.float32)
        nodes = [
            h.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=1),
            h.make_node("Gemm", ["flat_dq", "w"], ["y"], transB=1),
        ]
        inits = [nh.from_array(weight, "w_q"), nh.from_array(scale, "w_s")]
    elif kind == "matmul_cast_mul":  # int8-stored float weight, [in, out]
        scale = rng.uniform(0.001, 0.01, (1, OUTPUTS)).astype(np.float32)
        nodes = [
            h.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT),
            h.make_node("Mul", ["w_f", "w_s"], ["w"]),
            h.make_node("MatMul", ["flat_dq", "w"], ["y"]),
        ]
        inits = [nh.from_array(weight.T.copy(), "w_q"), nh.from_array(scale, "w_s")]
    else:  # a plain float weight, Gemm without transB
        nodes = [h.make_node("Gemm", ["flat_dq", "w"], ["y"])]
        inits = [nh.from_array(rng.normal(size=(FEATURES, OUTPUTS)).astype(np.float32), "w")]
    return nodes, inits


def _model(
    kind: str,
    *,
    float_conv: bool = False,
    shared: bool = False,
    zero_type: type = np.uint8,
) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv -> Q/DQ -> MaxPool -> Q/DQ -> Flatten -> Q/DQ -> dense -> y."""
    rng = np.random.default_rng(7)
    conv_input, pool_input = ("x", "c") if float_conv else ("x_dq", "c_dq")
    nodes = [
        h.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["x_q"]),
        h.make_node("DequantizeLinear", ["x_q", "a_s", "a_z"], ["x_dq"]),
        h.make_node("DequantizeLinear", ["k_q", "k_s", "k_z"], ["k"], axis=0),
        h.make_node("Conv", [conv_input, "k"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("QuantizeLinear", ["c", "c_s", "a_z"], ["c_q"]),
        h.make_node("DequantizeLinear", ["c_q", "c_s", "a_z"], ["c_dq"]),
        h.make_node("MaxPool", [pool_input], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("QuantizeLinear", ["p", "c_s", "a_z"], ["p_q"]),
        h.make_node("DequantizeLinear", ["p_q", "c_s", "a_z"], ["p_dq"]),
        h.make_node("Flatten", ["p_dq"], ["flat"]),
        h.make_node("QuantizeLinear", ["flat", "c_s", "a_z"], ["flat_q"]),
        h.make_node("DequantizeLinear", ["flat_q", "c_s", "a_z"], ["flat_dq"]),
    ]
    head, inits = _head(kind, rng)
    nodes += head
    outputs = [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUTPUTS])]
    if shared:  # a second layer reads the same stored weight
        nodes.append(h.make_node("Identity", ["w"], ["other"]))
        outputs.append(h.make_tensor_value_info("other", TensorProto.FLOAT, None))
    inits += [
        nh.from_array(np.array(1 / 255, np.float32), "a_s"),
        nh.from_array(np.array(0, zero_type), "a_z"),
        nh.from_array(np.array(0.05, np.float32), "c_s"),
        nh.from_array(rng.integers(-127, 128, (CHANNELS, 1, 3, 3)).astype(np.int8), "k_q"),
        nh.from_array(np.full(CHANNELS, 0.02, np.float32), "k_s"),
        nh.from_array(np.zeros(CHANNELS, np.int8), "k_z"),
    ]
    graph = h.make_graph(
        nodes,
        "flatten_head",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        outputs,
        inits,
    )
    opset = 17 if zero_type is np.uint8 else 21  # 16-bit QuantizeLinear from opset 21
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _rewritten(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    model = ir.serde.deserialize_model(proto)
    modified = FlattenChannelsLastPass()(model).modified
    return ir.serde.serialize_model(model), modified


def _run(proto: onnx.ModelProto, x: np.ndarray, tmp_path, tag: str):
    optimized = tmp_path / f"{tag}.onnx"
    session = make_session(proto.SerializeToString(), threads=1, optimized_path=optimized)
    kept = [node.op_type for node in onnx.load(optimized).graph.node]
    return session.run(["y"], {"x": x})[0], kept


@pytest.mark.parametrize(
    "kind", ["gemm_per_row", "gemm_per_input", "matmul_cast_mul", "gemm_float"]
)
def test_head_reads_the_nhwc_map_with_the_same_outputs(kind, tmp_path):
    built = _model(kind)
    rewritten, modified = _rewritten(built)
    assert modified
    x = np.random.default_rng(3).uniform(0, 1, (2, 1, SIDE, SIDE)).astype(np.float32)
    before, kept_before = _run(built, x, tmp_path, "before")
    after, kept_after = _run(rewritten, x, tmp_path, "after")
    # onnxruntime transposes the input to NHWC, and the map back to NCHW for the Flatten.
    assert kept_before.count("Transpose") == 2
    assert kept_after.count("Transpose") == 1
    # Only the float sums' order changes (the integer ones are exact).
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    if kind == "gemm_per_row":  # one integer kernel (QGemm): the same int32 sums
        assert "QGemm" in kept_after
        assert np.array_equal(after, before)
    assert np.abs(before).max() > 0.1  # the head computes something


@pytest.mark.parametrize("change", ["float_kernels", "sixteen_bit"])
def test_other_maps_are_left_alone(change):
    if change == "float_kernels":
        built = _model("gemm_per_row", float_conv=True)
    else:  # no integer kernels for 16-bit values: the maps stay NCHW
        built = _model("gemm_per_row", zero_type=np.uint16)
    _, modified = _rewritten(built)
    assert not modified


def test_weight_read_by_another_node_is_left_alone():
    built = _model("gemm_float", shared=True)
    rewritten, modified = _rewritten(built)
    assert not modified
    assert [n.op_type for n in rewritten.graph.node] == [n.op_type for n in built.graph.node]
