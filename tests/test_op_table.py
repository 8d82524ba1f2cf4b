"""The op policy table, op by op: a tiny graph per op, quantized, run in onnxruntime.

Each case checks the output's SQNR against the float model, the node layout qconvert
writes, and the integer kernel onnxruntime fuses the QDQ group into (read from the
session's optimized graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import qconvert
from qconvert import testing
from qconvert.config import QuantizeConfig

C = 4  # channels of the feature maps the op under test reads


def _conv(name: str, x: str, out: str, c_in: int, c_out: int, rng) -> tuple[list, list]:
    w = (rng.standard_normal((c_out, c_in, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(c_out) * 0.1).astype(np.float32)
    node = h.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, pads=[1] * 4)
    return [node], [nh.from_array(w, f"{name}_w"), nh.from_array(b, f"{name}_b")]


def _model(nodes, inits, inputs, outputs, opset=17) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "case", inputs, outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feature_model(op_nodes, op_inits, c_mid: int, *, two=False, seed=0) -> onnx.ModelProto:
    """input -> Conv (a) [, Conv (b)] -> the op under test (reads a/b, writes m) -> Conv."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv("conv_a", "input", "a", 3, C, rng)
    if two:
        n, i = _conv("conv_b", "input", "b", 3, C, rng)
        nodes += n
        inits += i
    n, i = _conv("conv_out", "m", "output", c_mid, 2, rng)
    nodes += op_nodes + n
    inits += op_inits + i
    return _model(
        nodes,
        inits,
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, "H", "W"])],
    )


@dataclass(frozen=True)
class Case:
    model: onnx.ModelProto
    op: str
    kernels: tuple[str, ...] = ()  # in onnxruntime's optimized graph
    min_sqnr: float = 25.0
    pass_through: bool = False
    quantized: bool = True
    inputs: dict = field(default_factory=dict)


def _cases() -> dict[str, Case]:
    one = lambda op, **kw: [h.make_node(op, ["a"], ["m"], name="op", **kw)]  # noqa: E731
    cases = {
        "Add": Case(
            _feature_model(
                [h.make_node("Add", ["a", "b"], ["m"], name="op")], [], C, two=True
            ),
            "Add",
            ("QLinearAdd",),
        ),
        "Add_constant": Case(
            _feature_model(
                [h.make_node("Add", ["a", "k"], ["m"], name="op")],
                # Varies along the width: a per-channel constant would fold into conv_a's
                # bias (passes/activations.py).
                [
                    nh.from_array(
                        np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 1, 1, 8), "k"
                    )
                ],
                C,
            ),
            "Add",
            ("QLinearAdd",),
        ),
        "Mul": Case(
            _feature_model(
                [h.make_node("Mul", ["a", "b"], ["m"], name="op")], [], C, two=True
            ),
            "Mul",
            ("QLinearMul",),
        ),
        "Concat": Case(
            _feature_model(
                [h.make_node("Concat", ["a", "b"], ["m"], name="op", axis=1)],
                [],
                2 * C,
                two=True,
            ),
            "Concat",
            ("QLinearConcat",),
        ),
        "AveragePool": Case(
            _feature_model(one("AveragePool", kernel_shape=[3, 3], pads=[1] * 4), [], C),
            "AveragePool",
            ("QLinearAveragePool",),
        ),
        "GlobalAveragePool": Case(
            # Pooled, then added back to the map: a Conv reading the pooled vector and
            # writing the output would be a classifier head, which computes in float.
            _feature_model(
                [
                    h.make_node("GlobalAveragePool", ["a"], ["g"], name="op"),
                    h.make_node("Add", ["a", "g"], ["m"], name="add"),
                ],
                [],
                C,
            ),
            "GlobalAveragePool",
            ("QLinearGlobalAveragePool",),
        ),
        "LeakyRelu": Case(
            _feature_model(one("LeakyRelu", alpha=0.1), [], C),
            "LeakyRelu",
            ("QLinearLeakyRelu",),
        ),
        "Sigmoid": Case(_feature_model(one("Sigmoid"), [], C), "Sigmoid", ("QLinearSigmoid",)),
        "HardSigmoid": Case(
            # After an Add: right after a Conv it would fold into the Conv and a Clip.
            _feature_model(
                [
                    h.make_node("Add", ["a", "b"], ["s"], name="add"),
                    h.make_node("HardSigmoid", ["s"], ["m"], name="op"),
                ],
                [],
                C,
                two=True,
            ),
            "HardSigmoid",
            quantized=False,
        ),
        "HardSwish": Case(
            _feature_model(one("HardSwish"), [], C), "HardSwish", quantized=False
        ),
        "Softmax": Case(
            _feature_model(one("Softmax", axis=1), [], C), "Softmax", ("QLinearSoftmax",)
        ),
        "MatMul_activations": Case(
            _feature_model(
                [h.make_node("MatMul", ["a", "b"], ["m"], name="op")], [], C, two=True
            ),
            "MatMul",
            ("QLinearMatMul",),
        ),
        "ConvTranspose": Case(
            _feature_model(
                [
                    h.make_node(
                        "ConvTranspose", ["a", "ct_w", "ct_b"], ["m"], name="op", pads=[1] * 4
                    )
                ],
                [
                    nh.from_array(
                        (np.random.default_rng(1).standard_normal((C, 6, 3, 3)) * 0.3).astype(
                            np.float32
                        ),
                        "ct_w",
                    ),
                    nh.from_array(np.linspace(-0.1, 0.1, 6, dtype=np.float32), "ct_b"),
                ],
                6,
            ),
            "ConvTranspose",
        ),
        "Slice": Case(
            _feature_model(
                [h.make_node("Slice", ["a", "st", "en", "ax"], ["m"], name="op")],
                [
                    nh.from_array(np.array([1], np.int64), "st"),
                    nh.from_array(np.array([7], np.int64), "en"),
                    nh.from_array(np.array([2], np.int64), "ax"),
                ],
                C,
            ),
            "Slice",
            pass_through=True,
        ),
        "Pad": Case(
            _feature_model(
                [h.make_node("Pad", ["a", "pads"], ["m"], name="op")],
                [nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")],
                C,
            ),
            "Pad",  # shares its input's parameters; onnxruntime keeps DQ -> Pad -> Q
        ),
        "Resize": Case(
            _feature_model(
                # align_corners: not a whole-factor repeat, which runs as a broadcast of
                # the integers instead (tests/test_resize_on_integers.py).
                [
                    h.make_node(
                        "Resize",
                        ["a", "", "scales"],
                        ["m"],
                        name="op",
                        mode="nearest",
                        coordinate_transformation_mode="align_corners",
                    )
                ],
                [nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
                C,
            ),
            "Resize",
            pass_through=True,
        ),
        "Split": Case(
            _feature_model(
                [
                    h.make_node("Split", ["a", "sp"], ["s0", "s1"], name="op", axis=1),
                    h.make_node("Concat", ["s1", "s0"], ["m"], name="join", axis=1),
                ],
                [nh.from_array(np.array([1, 3], np.int64), "sp")],
                C,
            ),
            "Split",
            pass_through=True,
        ),
        "Squeeze_Unsqueeze": Case(
            _feature_model(
                [
                    h.make_node("Unsqueeze", ["a", "ax0"], ["u"], name="op"),
                    h.make_node("Squeeze", ["u", "ax0"], ["m"], name="squeeze"),
                ],
                [nh.from_array(np.array([0], np.int64), "ax0")],
                C,
            ),
            "Unsqueeze",
            pass_through=True,
        ),
    }
    return cases


CASES = _cases()


def _calibrate(model: onnx.ModelProto, tmp_path, count=16):
    rng = np.random.default_rng(0)
    samples = [
        {"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count)
    ]
    return (
        testing.save(model, tmp_path / "model.onnx"),
        testing.write_samples(tmp_path / "calib", samples),
        samples,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_quantizes_and_fuses(name, tmp_path):
    case = CASES[name]
    path, calib, samples = _calibrate(case.model, tmp_path)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=calib)
    floats = {n.name: n.reason for n in report.conversion.float_nodes}
    if case.quantized:
        assert "op" not in floats, floats["op"]
    else:
        assert "no integer kernel" in floats["op"]
    assert testing.output_sqnr(path, out, samples) > case.min_sqnr
    optimized = testing.optimized_model(out, tmp_path)
    kernels = testing.count_ops(optimized)
    for kernel in case.kernels:
        assert kernels[kernel] >= 1, kernels
    if case.quantized:
        assert kernels["QLinearConv"] >= 1, kernels
    else:
        # Between the input and a float op, the 3-channel Conv would be an int8 island.
        assert "thin Conv between float ops" in floats["conv_a"], floats
    if case.pass_through:
        # onnxruntime runs the op on the integers: no DequantizeLinear feeds it and no
        # QuantizeLinear follows it.
        producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
        node = next(n for n in optimized.graph.node if n.op_type == case.op)
        assert producers.get(node.input[0]) != "DequantizeLinear"
        readers = [n.op_type for n in optimized.graph.node if node.output[0] in n.input]
        assert "QuantizeLinear" not in readers, readers


OTHER_SCHEMES = (
    QuantizeConfig(scheme="16x8"),
    QuantizeConfig(format="qop"),
    QuantizeConfig(scheme="int8-dynamic"),
    QuantizeConfig(scheme="fp16"),
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_under_every_other_scheme_loads_runs_and_stays_close(name, tmp_path):
    case = CASES[name]
    path, calib, samples = _calibrate(case.model, tmp_path, count=8)
    for config in OTHER_SCHEMES:
        out = tmp_path / f"{config.scheme}-{config.format.value}.onnx"
        data = calib if config.needs_calibration else None
        qconvert.quantize(path, out, data=data, config=config)
        bound = {"16x8": 35.0, "fp16": 50.0}.get(config.scheme, case.min_sqnr)
        assert testing.output_sqnr(path, out, samples) > bound, config


QOP_KERNELS = {
    "Add": "QLinearAdd",
    "Add_constant": "QLinearAdd",
    "Mul": "QLinearMul",
    "Concat": "QLinearConcat",
    "AveragePool": "QLinearAveragePool",
    "GlobalAveragePool": "QLinearGlobalAveragePool",
    "LeakyRelu": "QLinearLeakyRelu",
    "Sigmoid": "QLinearSigmoid",
    "Softmax": "QLinearSoftmax",
}


@pytest.mark.parametrize("name", sorted(QOP_KERNELS))
def test_qop_format_writes_the_integer_operator_of_each_op(name, tmp_path):
    case = CASES[name]
    path, calib, samples = _calibrate(case.model, tmp_path, count=8)
    out = tmp_path / "qop.onnx"
    qconvert.quantize(path, out, data=calib, config=QuantizeConfig(format="qop"))
    written = onnx.load_model(str(out))
    kernel = QOP_KERNELS[name]
    node = next(n for n in written.graph.node if n.op_type == kernel)
    assert node.domain == "com.microsoft"
    # The kernel reads and writes integers: no DequantizeLinear feeds it, no
    # QuantizeLinear follows it.
    producers = {o: n.op_type for n in written.graph.node for o in n.output}
    assert all(producers.get(name) != "DequantizeLinear" for name in node.input)
    readers = [n.op_type for n in written.graph.node if node.output[0] in n.input]
    assert readers and "QuantizeLinear" not in readers, readers
    assert testing.output_sqnr(path, out, samples) > case.min_sqnr
