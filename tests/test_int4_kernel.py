"""`--int4-kernel int8`: 4-bit codes on an int8 grid, expanded by onnxruntime at load and run
by DynamicQuantizeMatMul; checked on graphs built here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qconvert
from qconvert import testing
from qconvert.blockwise import quantize_rtn
from qconvert.config import QuantizeConfig


def test_int8_grid_scales_are_whole_multiples_of_the_column_unit():
    # column max 4 -> unit 4/120 = 1/30; block [1,-2,0.5,4]: scale 4/-8 = -0.5 = -15 units;
    # block [0.3,0.1,-0.2,0]: scale 0.3/-8 = -0.0375 = -1.125 units -> -1 unit
    weights = np.array([[1.0, -2.0, 0.5, 4.0, 0.3, 0.1, -0.2, 0.0]], dtype=np.float32)
    units = np.abs(weights).max(axis=1) / 120
    quantized = quantize_rtn(weights, block_size=4, units=units.astype(np.float32))
    assert quantized.multipliers().tolist() == [[-15, -1]]
    # codes: round(w / (m * unit)) + 8; the second block's step is one unit, 1/30
    assert quantized.codes.tolist() == [[6, 12, 7, 0, 0, 5, 14, 8]]
    # (code - 8) * m: 0.3 clips to -8 steps of -1/30
    assert quantized.int8_weight().tolist() == [[30, -60, 15, 120, 8, 3, -6, 0]]
    np.testing.assert_array_equal(
        quantized.int8_weight() * quantized.units[:, None], quantized.dequantize()
    )


def _int8_weights(quantized: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per DynamicQuantizeMatMul output: its weight (K, N) as the file's INT4 codes times the
    int8 multipliers times the column units stand for, read from the initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    producers = {node.output[0]: node for node in quantized.graph.node}

    def source(name: str, op_type: str) -> onnx.NodeProto:
        node = producers[name]
        while node.op_type != op_type:
            node = producers[node.input[0]]
        return node

    weights = {}
    for node in quantized.graph.node:
        if node.op_type != "DynamicQuantizeMatMul":
            continue
        mul = source(node.input[1], "Mul")
        codes = inits[producers[mul.input[0]].input[0]].astype(np.int32)
        multipliers = inits[producers[mul.input[1]].input[0]].astype(np.int32)
        assert multipliers.dtype == np.int32 and np.abs(multipliers).max() <= 15
        assert np.abs(multipliers).min() >= 1
        values = (codes * multipliers).reshape(-1, codes.shape[-1])
        units = inits[node.input[2]]
        weight = values * units
        scale = producers.get(node.input[0])
        if scale is not None and scale.op_type == "Mul" and scale.input[1] in inits:
            weight = inits[scale.input[1]][:, None] * weight  # (x / s) @ W' = x @ W'/s
        weights[node.output[0]] = weight
    return weights


def _id_samples(tmp_path):
    """Eight batches of token ids for embedding_mlp, written as a data folder."""
    rng = np.random.default_rng(5)
    samples = [{"ids": rng.integers(0, 50, (2, 7)).astype(np.int64)} for _ in range(8)]
    return testing.write_samples(tmp_path / "data", samples)


@pytest.mark.parametrize("with_data", [False, True])
def test_int8_kernel_runs_as_dynamic_quantize_matmul_on_the_int4_weights(tmp_path, with_data):
    float_model = testing.embedding_mlp(d=128, hidden=96)
    path = testing.save(float_model, tmp_path / "model.onnx")
    data = _id_samples(tmp_path) if with_data else None
    out = tmp_path / "model.int4.onnx"
    config = QuantizeConfig(scheme="int4", quantize_embeddings=True, int4_kernel="int8")
    report = qconvert.quantize(path, out, data=data, config=config)
    assert any("int8 kernel" in note for note in report.conversion.notes)
    quantized = onnx.load(out)
    ops = testing.count_ops(quantized)
    assert ops["DynamicQuantizeMatMul"] == 3 and ops["GatherBlockQuantized"] == 1
    assert "MatMul" not in ops and "Gemm" not in ops
    # the file holds INT4 codes; onnxruntime folds them into int8 weights at load
    int4 = [t for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 4  # three weights and the table
    optimized = testing.optimized_ops(out, tmp_path)
    # with data, layers whose input scaling (AWQ-class) was kept read x through a Mul
    scaled = sum(note.count("Mul by 1/s") for note in report.conversion.notes)
    assert optimized.pop("Mul", 0) == (optimized_scaled := _scaled_layers(quantized))
    assert not with_data or scaled == 1
    assert optimized == {
        "GatherBlockQuantized": 1,
        "DynamicQuantizeMatMul": 3,
        "Add": 1,  # the first layer's bias
        "Relu": 1,
        "ReduceMean": 1,
    }
    if not with_data:
        assert optimized_scaled == 0
    # against the float model on the weights the file stands for: activation rounding only
    weights = _int8_weights(quantized)
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(float_model)
    by_name = {t.name: t for t in rebuilt.graph.initializer}
    for output, w_kn in weights.items():
        node = next(n for n in rebuilt.graph.node if output in n.output)
        transposed = node.op_type == "Gemm"
        tensor = by_name[node.input[1]]
        value = (w_kn.T if transposed else w_kn).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    # the table as GatherBlockQuantized stores it: the same in both
    table = _table(quantized)
    by_name["table"].CopyFrom(numpy_helper.from_array(table, "table"))
    feeds = [{"ids": np.random.default_rng(s).integers(0, 50, (3, 7))} for s in (1, 2)]
    assert testing.output_sqnr(rebuilt, out, feeds) > 30
    assert testing.output_sqnr(float_model, out, feeds) > 10


def _scaled_layers(quantized: onnx.ModelProto) -> int:
    """DynamicQuantizeMatMul nodes whose input is a Mul by a constant (the input scale)."""
    producers = {node.output[0]: node for node in quantized.graph.node}
    return sum(
        1
        for node in quantized.graph.node
        if node.op_type == "DynamicQuantizeMatMul"
        and producers.get(node.input[0]) is not None
        and producers[node.input[0]].op_type == "Mul"
    )


def _table(quantized: onnx.ModelProto) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    (node,) = [n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized"]
    size = next(a.i for a in node.attribute if a.name == "block_size")
    data = inits[node.input[0]].astype(np.float32)
    return (data * np.repeat(inits[node.input[2]], size, axis=1)).astype(np.float32)


def test_int8_kernel_slices_off_the_padding_of_a_partial_last_block(tmp_path):
    float_model = testing.matmul_add(k=40, n=8)
    path = testing.save(float_model, tmp_path / "model.onnx")
    out = tmp_path / "model.int4.onnx"
    qconvert.quantize(path, out, config=QuantizeConfig(scheme="int4", int4_kernel="int8"))
    assert testing.count_ops(out)["Slice"] == 1
    assert testing.optimized_ops(out, tmp_path)["DynamicQuantizeMatMul"] == 1
    feeds = [testing.random_inputs(float_model, seed=s) for s in (1, 2)]
    assert testing.output_sqnr(float_model, out, feeds) > 15


@pytest.mark.parametrize(
    ("with_data", "options", "external", "kernel"),
    [
        (False, {}, False, "DynamicQuantizeMatMul"),  # the searched grid makes up for it
        (True, {}, False, "DynamicQuantizeMatMul"),
        (False, {"asymmetric_weights": True}, False, "MatMulNBits"),
        (False, {}, True, "MatMulNBits"),
        (True, {"asymmetric_weights": True}, False, "MatMulNBits"),  # zero points
        (True, {"accuracy_level": 0}, False, "MatMulNBits"),
        (True, {}, True, "MatMulNBits"),  # no size budget, no opset upgrade in place
    ],
)
def test_the_default_kernel_is_int8_unless_an_option_or_external_data_asks_for_nbits(
    tmp_path, with_data, options, external, kernel
):
    float_model = testing.embedding_mlp(d=128, hidden=96)
    if external:
        (tmp_path / "ext").mkdir()
        path = testing.save_with_external_data(float_model, tmp_path / "ext" / "model.onnx")
    else:
        path = testing.save(float_model, tmp_path / "model.onnx")
    data = _id_samples(tmp_path) if with_data else None
    out = tmp_path / "model.int4.onnx"
    qconvert.quantize(path, out, data=data, config=QuantizeConfig(scheme="int4", **options))
    ops = testing.count_ops(onnx.load(out, load_external_data=False))
    other = ({"MatMulNBits", "DynamicQuantizeMatMul"} - {kernel}).pop()
    assert ops[kernel] == 3 and other not in ops
