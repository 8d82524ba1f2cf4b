"""Model structures that break naive quantizers, built small in code.

Weights an exporter hides in Constant nodes or behind Identity/Cast/Reshape/Transpose, a
detector head concatenating pixel coordinates with scores, BatchNormalization after Gemm
and ConvTranspose, embeddings, shared initializers, excluded nodes that must stay float,
and ops qconvert leaves float, which the report must list with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import qconvert
from qconvert import testing
from qconvert.config import QuantizeConfig
from qconvert.plan import concat as plan_concat
from qconvert.runtime import make_session


def _model(nodes, inits, inputs, outputs, opset=17) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "case", inputs, outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(shape, count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _quantize(model, tmp_path, samples, config=None):
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=calib, config=config or QuantizeConfig())
    return path, out, report


def _initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load_model(str(path))
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def _float_reasons(report) -> dict[str, str]:
    return {n.name: n.reason for n in report.conversion.float_nodes}


def _hidden_weights_model() -> onnx.ModelProto:
    """Three MatMuls whose weights sit where some exporters put them: a Constant node, an
    initializer read through Transpose, and a float64 initializer (as numpy-based exporters
    write them) through Cast, Reshape and Identity."""
    rng = np.random.default_rng(0)
    w_const = (rng.standard_normal((64, 64)) * 0.2).astype(np.float32)
    w_t = (rng.standard_normal((64, 64)) * 0.2).astype(np.float32)
    w_half = (rng.standard_normal(64 * 64) * 0.2).astype(np.float64)
    nodes = [
        h.make_node("Constant", [], ["w1"], name="const", value=nh.from_array(w_const, "w1v")),
        h.make_node("MatMul", ["input", "w1"], ["h1"], name="mm1"),
        h.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        h.make_node("Transpose", ["w_t"], ["w2"], name="transpose_w", perm=[1, 0]),
        h.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        h.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        h.make_node("Cast", ["w_half"], ["w3_flat"], name="cast_w", to=TensorProto.FLOAT),
        h.make_node("Reshape", ["w3_flat", "w3_shape"], ["w3_id"], name="reshape_w"),
        h.make_node("Identity", ["w3_id"], ["w3"], name="identity_w"),
        h.make_node("MatMul", ["r2", "w3"], ["output"], name="mm3"),
    ]
    inits = [
        nh.from_array(w_t, "w_t"),
        nh.from_array(w_half, "w_half"),
        nh.from_array(np.array([64, 64], np.int64), "w3_shape"),
    ]
    return _model(
        nodes,
        inits,
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 64])],
    )


def test_weights_in_constant_nodes_and_behind_constant_chains_become_int8(tmp_path):
    samples = _samples((1, 64), 16)
    path, out, report = _quantize(_hidden_weights_model(), tmp_path, samples)
    assert out.stat().st_size <= 0.30 * path.stat().st_size
    assert report.conversion.quantized_ops["MatMul"] == 3
    big = {n: a for n, a in _initializers(out).items() if a.size >= 64 * 64}
    assert len(big) == 3 and all(a.dtype == np.int8 for a in big.values()), big.keys()
    ops = testing.count_ops(out)
    assert not {"Constant", "Transpose", "Cast", "Reshape", "Identity"} & set(ops)
    assert testing.output_sqnr(path, out, samples) > 25.0
    assert testing.optimized_ops(out, tmp_path)["QLinearMatMul"] >= 2


def _detector_agreement(path, out, count=400) -> float:
    reference, candidate = make_session(str(path)), make_session(str(out))
    agree = 0
    for feeds in _samples((1, 16), count, seed=1):
        scores = [s.run(None, feeds)[0][0, 0, 4:] for s in (reference, candidate)]
        agree += int(np.argmax(scores[0]) == np.argmax(scores[1]))
    return agree / count


def test_mixed_range_concat_stays_float_and_keeps_the_top_score(tmp_path, monkeypatch):
    samples = _samples((1, 16), 32, seed=1)
    path, out, report = _quantize(testing.detector_head(), tmp_path, samples)
    reasons = _float_reasons(report)
    concat = next(n for n in report.conversion.float_nodes if n.op_type == "Concat")
    assert concat.reason.startswith("mixed-range Concat: input 'boxes' spans")
    assert any("mixed-range Concat" in note for note in report.conversion.notes)
    reshape = next(n for n in report.conversion.float_nodes if n.op_type == "Reshape")
    assert reshape.reason == concat.reason  # what follows to the output stays float too
    assert report.conversion.quantized_ops["MatMul"] == 3, reasons
    assert _detector_agreement(path, out) >= 0.99
    # A quantizer giving the concatenated tensor one scale loses the scores.
    monkeypatch.setattr(plan_concat, "MIXED_RANGE_RATIO", float("inf"))
    naive = tmp_path / "naive.onnx"
    qconvert.quantize(path, naive, data=tmp_path / "calib")
    assert _detector_agreement(path, naive) < 0.8


def test_concat_inputs_of_similar_range_share_the_output_parameters(tmp_path):
    rng = np.random.default_rng(0)
    w = [(rng.standard_normal((8, 8)) * s).astype(np.float32) for s in (0.3, 0.5, 0.3)]
    model = _model(
        [
            h.make_node("MatMul", ["input", "wa"], ["a"], name="mm_a"),
            h.make_node("MatMul", ["input", "wb"], ["b"], name="mm_b"),
            h.make_node("Concat", ["a", "b"], ["c"], name="concat", axis=1),
            h.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
            h.make_node("MatMul", ["r", "wc"], ["output"], name="mm_c"),
        ],
        [
            nh.from_array(w[0], "wa"),
            nh.from_array(w[1], "wb"),
            nh.from_array(np.array([-1, 8], np.int64), "shape"),
            nh.from_array(w[2], "wc"),
        ],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, [2, 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, [4, 8])],
    )
    samples = _samples((2, 8), 16)
    path, out, _ = _quantize(model, tmp_path, samples)
    graph = onnx.load_model(str(out)).graph
    quantize = {n.input[0]: n.input[1] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert quantize["a"] == quantize["b"] == quantize["c"]
    assert testing.output_sqnr(path, out, samples) > 25.0
    assert testing.optimized_ops(out, tmp_path)["QLinearConcat"] == 1


def _gemm_bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 6
    return _model(
        [
            h.make_node("Gemm", ["input", "w", "b"], ["g"], name="gemm", transB=1),
            h.make_node("BatchNormalization", ["g", "s", "bb", "m", "v"], ["n"], name="bn"),
            h.make_node("Relu", ["n"], ["r"], name="relu"),
            h.make_node("Gemm", ["r", "w2"], ["output"], name="fc"),
        ],
        [
            nh.from_array((rng.standard_normal((c, 8)) * 0.4).astype(np.float32), "w"),
            nh.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), "b"),
            nh.from_array((1 + 0.3 * rng.standard_normal(c)).astype(np.float32), "s"),
            nh.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), "bb"),
            nh.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), "m"),
            nh.from_array((0.5 + rng.random(c)).astype(np.float32), "v"),
            nh.from_array((rng.standard_normal((c, 3)) * 0.4).astype(np.float32), "w2"),
        ],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
    )


def _conv_transpose_bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return _model(
        [
            h.make_node("ConvTranspose", ["input", "w"], ["t"], name="deconv", strides=[2, 2]),
            h.make_node("BatchNormalization", ["t", "s", "bb", "m", "v"], ["n"], name="bn"),
            h.make_node("Relu", ["n"], ["r"], name="relu"),
            h.make_node("Conv", ["r", "w2"], ["output"], name="conv"),
        ],
        [
            nh.from_array((rng.standard_normal((3, 5, 2, 2)) * 0.4).astype(np.float32), "w"),
            nh.from_array((1 + 0.3 * rng.standard_normal(5)).astype(np.float32), "s"),
            nh.from_array((rng.standard_normal(5) * 0.1).astype(np.float32), "bb"),
            nh.from_array((rng.standard_normal(5) * 0.1).astype(np.float32), "m"),
            nh.from_array((0.5 + rng.random(5)).astype(np.float32), "v"),
            nh.from_array((rng.standard_normal((2, 5, 1, 1)) * 0.4).astype(np.float32), "w2"),
        ],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 8, 8])],
    )


@pytest.mark.parametrize(
    ("build", "shape", "weight_axis"),
    [(_gemm_bn_model, (1, 8), 0), (_conv_transpose_bn_model, (1, 3, 4, 4), 1)],
    ids=["gemm", "conv_transpose"],
)
def test_batchnorm_folds_into_gemm_and_conv_transpose(tmp_path, build, shape, weight_axis):
    samples = _samples(shape, 16)
    path, out, _ = _quantize(build(), tmp_path, samples)
    ops = testing.count_ops(out)
    assert "BatchNormalization" not in ops and "Relu" not in ops  # folded, then absorbed
    assert testing.output_sqnr(path, out, samples) > 30.0
    graph = onnx.load_model(str(out)).graph
    first = graph.node[0].op_type if graph.node[0].op_type != "QuantizeLinear" else ""
    weights = [
        n
        for n in graph.node
        if n.op_type == "DequantizeLinear" and "folded_weight" in n.input[0]
    ]
    assert len(weights) == 1 and first == ""
    axis = next(a.i for a in weights[0].attribute if a.name == "axis")
    assert axis == weight_axis


def _embedding_model(rng) -> onnx.ModelProto:
    table = (rng.standard_normal((1000, 64)) * 0.5).astype(np.float32)
    return _model(
        [
            h.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
            h.make_node("MatMul", ["emb", "w"], ["hid"], name="mm"),
            h.make_node("Gather", ["hid", "pick"], ["picked"], name="pick_token", axis=1),
            h.make_node("MatMul", ["picked", "w2"], ["output"], name="head"),
        ],
        [
            nh.from_array(table, "table"),
            nh.from_array((rng.standard_normal((64, 16)) * 0.3).astype(np.float32), "w"),
            nh.from_array(np.array(0, np.int64), "pick"),
            nh.from_array((rng.standard_normal((16, 4)) * 0.3).astype(np.float32), "w2"),
        ],
        [h.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )


def test_int8_dynamic_stores_embedding_tables_as_int8(tmp_path):
    rng = np.random.default_rng(0)
    path = testing.save(_embedding_model(rng), tmp_path / "model.onnx")
    samples = [{"ids": rng.integers(0, 1000, (1, 6)).astype(np.int64)} for _ in range(8)]
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, config=QuantizeConfig(scheme="int8-dynamic"))
    assert report.conversion.quantized_ops == {"Gather": 1, "MatMul": 2}
    assert _float_reasons(report)["pick_token"] == "Gather on activations: stays float"
    _assert_table_dequantized_at_load(out, tmp_path)
    assert out.stat().st_size <= 0.30 * path.stat().st_size
    assert testing.output_sqnr(path, out, samples) > 25.0


def _assert_table_dequantized_at_load(out, tmp_path):
    """The table is int8, one scale per row, read through Mul(Cast(table_q), scale):
    onnxruntime folds that when it loads the model, so the Gather reads a float
    initializer instead of dequantizing the whole table at every run."""
    graph = onnx.load_model(str(out)).graph
    producers = {o: n for n in graph.node for o in n.output}
    gather = next(n for n in graph.node if n.name == "embed")
    multiply = producers[gather.input[0]]
    cast = producers[multiply.input[0]]
    assert (multiply.op_type, cast.op_type) == ("Mul", "Cast")
    inits = _initializers(out)
    assert inits[cast.input[0]].dtype == np.int8 and inits[cast.input[0]].shape == (1000, 64)
    assert inits[multiply.input[1]].shape == (1000, 1)
    optimized = testing.optimized_model(out, tmp_path)
    folded = {t.name for t in optimized.graph.initializer}
    gather = next(
        n for n in optimized.graph.node if n.op_type == "Gather" and "ids" in n.input
    )
    assert gather.input[0] in folded, [n.op_type for n in optimized.graph.node]


def test_embedding_table_is_int8_per_row_and_gather_on_activations_passes_through(tmp_path):
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((1000, 64)) * 0.5).astype(np.float32)
    model = _model(
        [
            h.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
            h.make_node("MatMul", ["emb", "w"], ["hid"], name="mm"),
            h.make_node("Gather", ["hid", "pick"], ["picked"], name="pick_token", axis=1),
            h.make_node("MatMul", ["picked", "w2"], ["output"], name="head"),
        ],
        [
            nh.from_array(table, "table"),
            nh.from_array((rng.standard_normal((64, 16)) * 0.3).astype(np.float32), "w"),
            nh.from_array(np.array(0, np.int64), "pick"),
            nh.from_array((rng.standard_normal((16, 4)) * 0.3).astype(np.float32), "w2"),
        ],
        [h.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )
    samples = [{"ids": rng.integers(0, 1000, (1, 6)).astype(np.int64)} for _ in range(16)]
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=calib)
    assert report.conversion.quantized_ops == {"Gather": 2, "MatMul": 2}
    _assert_table_dequantized_at_load(out, tmp_path)
    assert testing.output_sqnr(path, out, samples) > 25.0
    assert out.stat().st_size <= 0.30 * path.stat().st_size


def test_an_initializer_shared_by_several_nodes_is_quantized_once(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(
        [
            h.make_node("MatMul", ["input", "w"], ["a"], name="mm1"),
            h.make_node("Relu", ["a"], ["r"], name="relu"),
            h.make_node("MatMul", ["r", "w"], ["output"], name="mm2"),
        ],
        [nh.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w")],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16])],
    )
    samples = _samples((1, 16), 16)
    path, out, _ = _quantize(model, tmp_path, samples)
    weights = [a for a in _initializers(out).values() if a.size == 256]
    assert len(weights) == 1 and weights[0].dtype == np.int8
    graph = onnx.load_model(str(out)).graph
    assert (
        sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_q")
        == 1
    )
    assert testing.output_sqnr(path, out, samples) > 25.0


def _three_convs() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    shapes = {"w1": (4, 3, 3, 3), "w2": (5, 4, 3, 3), "w3": (2, 5, 3, 3)}
    nodes, inits = [], []
    x = "input"
    for index, (name, shape) in enumerate(shapes.items(), start=1):
        out = "output" if index == 3 else f"r{index}"
        conv_out = out if index == 3 else f"c{index}"
        nodes.append(
            h.make_node(
                "Conv", [x, name, f"b{index}"], [conv_out], name=f"conv{index}", pads=[1] * 4
            )
        )
        if index < 3:
            nodes.append(h.make_node("Relu", [conv_out], [out], name=f"relu{index}"))
        inits += [
            nh.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name),
            nh.from_array(
                (rng.standard_normal(shape[0]) * 0.1).astype(np.float32), f"b{index}"
            ),
        ]
        x = out
    return _model(
        nodes,
        inits,
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 8, 8])],
    )


def test_excluded_conv_stays_float_in_onnxruntime_too(tmp_path):
    samples = _samples((1, 3, 8, 8), 8)
    path, out, report = _quantize(
        _three_convs(), tmp_path, samples, QuantizeConfig(exclude=("conv2",))
    )
    assert _float_reasons(report)["conv2"] == "excluded by --exclude 'conv2'"
    # The excluded Conv reads the float tensor: had it read a DequantizeLinear output,
    # onnxruntime would quantize its weights and run it as a QLinearConv.
    optimized = testing.optimized_model(out, tmp_path)
    initializers = {t.name: t for t in optimized.graph.initializer}
    float_weights = [
        tuple(initializers[n.input[1]].dims)
        for n in optimized.graph.node
        if n.op_type in ("Conv", "FusedConv")
        and n.input[1] in initializers
        and initializers[n.input[1]].data_type == TensorProto.FLOAT
    ]
    # (onnxruntime may lay the weight out anew for its NCHWc kernels, padding channels)
    # conv1, whose output only the float conv2 reads, is planned float with it: as int8
    # nothing would read its integers, and onnxruntime would run it in float anyway.
    assert "float" in _float_reasons(report)["conv1"]
    assert sorted(dims[1:] for dims in float_weights) == [(3, 3, 3), (4, 3, 3)], float_weights
    assert testing.output_sqnr(path, out, samples) > 25.0


def test_excluded_conv_after_a_folded_relu_reads_the_relu_output(tmp_path):
    # conv0 -> relu0 -> {conv_a, conv_b} -> Add: the excluded conv_a reads relu0's float
    # output, so it sees exactly what it saw in float (no negative values). conv0, which
    # conv_a reads in float, computes in float too: onnxruntime fuses no integer Conv whose
    # output a float node reads beside a QuantizeLinear, so relu0 is not folded either;
    # conv_b, thin (4 input channels) and now between float ops, computes in float too.
    rng = np.random.default_rng(0)

    def conv(name, x, out, c_in, c_out):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * 0.3).astype(np.float32)
        node = h.make_node("Conv", [x, f"{name}_w"], [out], name=name, pads=[1] * 4)
        return node, nh.from_array(w, f"{name}_w")

    parts = [
        conv("conv0", "input", "c0", 3, 4),
        conv("conv_a", "r0", "a", 4, 2),
        conv("conv_b", "r0", "b", 4, 2),
    ]
    nodes = [parts[0][0], h.make_node("Relu", ["c0"], ["r0"], name="relu0")]
    nodes += [parts[1][0], parts[2][0], h.make_node("Add", ["a", "b"], ["output"], name="add")]
    model = _model(
        nodes,
        [init for _, init in parts],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 8, 8])],
    )
    samples = _samples((1, 3, 8, 8), 8)
    config = QuantizeConfig(exclude=("conv_a",))
    path, out, report = _quantize(model, tmp_path, samples, config)
    assert "relu0" not in report.conversion.folded_clamps
    assert "a node left float reads its output" in _float_reasons(report)["conv0"]
    written = onnx.load_model(str(out))
    conv_a = next(n for n in written.graph.node if n.name == "conv_a")
    relu = next(n for n in written.graph.node if n.op_type == "Relu")
    assert conv_a.input[0] == relu.output[0] and relu.input[0] == "c0"
    assert testing.output_sqnr(path, out, samples) > 25.0


def test_float_ops_are_listed_with_their_reasons(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(
        [
            h.make_node("MatMul", ["input", "w"], ["a"], name="mm"),
            h.make_node("LayerNormalization", ["a", "g", "b"], ["n"], name="norm"),
            h.make_node("Erf", ["n"], ["e"], name="erf"),
            h.make_node("MatMul", ["e", "w"], ["output"], name="mm2"),
        ],
        [
            nh.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "w"),
            nh.from_array(np.ones(8, np.float32), "g"),
            nh.from_array(np.zeros(8, np.float32), "b"),
        ],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8])],
    )
    samples = _samples((1, 8), 8)
    path, out, report = _quantize(model, tmp_path, samples)
    reasons = _float_reasons(report)
    assert reasons["norm"].startswith("normalizes by per-sample statistics")
    assert reasons["erf"] == "not in the op table: stays float"
    assert report.conversion.quantized_ops == {"MatMul": 2}
    assert testing.output_sqnr(path, out, samples) > 25.0


def _if_model() -> onnx.ModelProto:
    """MatMul -> Relu -> If(cond): each branch a MatMul with its own weight (a Constant in
    one branch, an initializer of the branch in the other)."""
    rng = np.random.default_rng(0)
    side = 64

    def weights(scale=0.2):
        return (rng.standard_normal((side, side)) * scale).astype(np.float32)

    then_branch = h.make_graph(
        [
            h.make_node(
                "Constant",
                [],
                ["w_then"],
                name="then_const",
                value=nh.from_array(weights(), "w_then"),
            ),
            h.make_node("MatMul", ["r", "w_then"], ["then_out"], name="then_mm"),
        ],
        "then",
        [],
        [h.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", side])],
    )
    else_branch = h.make_graph(
        [h.make_node("MatMul", ["r", "w_else"], ["else_out"], name="else_mm")],
        "else",
        [],
        [h.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", side])],
        [nh.from_array(weights(), "w_else")],
    )
    return _model(
        [
            h.make_node("MatMul", ["input", "w0"], ["a"], name="mm"),
            h.make_node("Relu", ["a"], ["r"], name="relu"),
            h.make_node(
                "If",
                ["cond"],
                ["output"],
                name="branch",
                then_branch=then_branch,
                else_branch=else_branch,
            ),
        ],
        [nh.from_array(weights(), "w0")],
        [
            h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", side]),
            h.make_tensor_value_info("cond", TensorProto.BOOL, [1]),
        ],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", side])],
    )


def _if_samples():
    rng = np.random.default_rng(0)
    return [
        {
            "input": rng.standard_normal((1, 64)).astype(np.float32),
            "cond": np.array([i % 2 == 0]),
        }
        for i in range(8)
    ]


def test_nodes_inside_if_branches_are_quantized_and_fused_there(tmp_path):
    samples = _if_samples()
    path, out, report = _quantize(_if_model(), tmp_path, samples)
    # The MatMul before the If and one in each branch; the Relu folded.
    assert report.conversion.quantized_ops == {"MatMul": 3, "Relu": 1}
    reason = _float_reasons(report)["branch"]
    assert reason == (
        "holds subgraphs, and stays float itself: 2 of the 2 node(s) inside quantized"
    )
    assert any(note.startswith("branch: holds subgraphs") for note in report.conversion.notes)
    # The branches' weights are stored in their branch, where their readers are.
    written = onnx.load_model(str(out))
    graphs = [written.graph, *(a.g for n in written.graph.node for a in n.attribute if a.g)]
    big = [nh.to_array(t) for g in graphs for t in g.initializer if t.dims == [64, 64]]
    assert len(big) == 3 and all(a.dtype == np.int8 for a in big)
    # A quarter for the int8 weights, plus per-channel scales and the Q/DQ nodes of the
    # activations, which weigh in this 12k-parameter model.
    assert out.stat().st_size <= 0.32 * path.stat().st_size
    assert testing.output_sqnr(path, out, samples) > 25.0  # both branches are taken
    # onnxruntime runs each branch's MatMul on its int8 weights (the branch output is
    # float, so MatMulNBits with 8-bit weights, or an integer MatMul).
    optimized = testing.optimized_model(out, tmp_path)
    branch = next(n for n in optimized.graph.node if n.op_type == "If")
    integer_kernels = {"QLinearMatMul", "MatMulIntegerToFloat", "MatMulNBits"}
    for attribute in branch.attribute:
        ops = [n.op_type for n in attribute.g.node]
        assert integer_kernels & set(ops) and "MatMul" not in ops, ops


def test_a_loop_body_is_quantized_with_ranges_seen_over_its_iterations(tmp_path):
    rng = np.random.default_rng(0)
    samples = [{"input": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(8)]
    path, out, report = _quantize(testing.loop_matmul_relu(3), tmp_path, samples)
    assert report.conversion.quantized_ops == {"MatMul": 1}
    # The carried value's range spans every iteration: the input's and the Relu's.
    calibration = qconvert.calibrate(path, tmp_path / "calib")
    seen = calibration.observers["x_in"]
    first = min(float(s["input"].min()) for s in samples)
    assert seen.min == first and seen.max > 0
    assert testing.output_sqnr(path, out, samples) > 25.0
    optimized = testing.optimized_model(out, tmp_path)
    loop = next(n for n in optimized.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    # The Relu writes the carried value, a body output that stays float, so the MatMul
    # writes float from its integer kernel (`_writes_float`).
    body_ops = [n.op_type for n in body.node]
    assert "MatMulIntegerToFloat" in body_ops and "MatMul" not in body_ops


@pytest.mark.parametrize("scheme", ["int8", "16x8", "int8-dynamic", "fp16", "fp16-weights"])
def test_samples_of_different_lengths_are_accepted_by_every_scheme(tmp_path, scheme):
    model = testing.sequence_mlp()
    rng = np.random.default_rng(0)
    samples = [
        {"tokens": rng.standard_normal((1, length, 8)).astype(np.float32)}
        for length in (3, 7, 12, 5, 1, 9)
    ]
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "q.onnx"
    config = QuantizeConfig(scheme=scheme)
    qconvert.quantize(
        path, out, data=calib if config.needs_calibration else None, config=config
    )
    assert testing.output_sqnr(path, out, samples) > 25.0


@pytest.mark.parametrize(
    ("build", "feeds"),
    [
        (
            _if_model,
            lambda rng: {
                "input": rng.standard_normal((1, 64)).astype(np.float32),
                "cond": np.array([True]),
            },
        ),
        (
            testing.detector_head,
            lambda rng: {"input": rng.standard_normal((1, 16)).astype(np.float32)},
        ),
        (
            _hidden_weights_model,
            lambda rng: {"input": rng.standard_normal((1, 64)).astype(np.float32)},
        ),
        (
            _conv_transpose_bn_model,
            lambda rng: {"input": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)},
        ),
    ],
    ids=["if", "detector", "hidden_weights", "conv_transpose_bn"],
)
@pytest.mark.parametrize("scheme", ["fp16", "fp16-weights", "int8-dynamic"])
def test_every_scheme_loads_the_structures_int8_accepts(tmp_path, build, feeds, scheme):
    rng = np.random.default_rng(0)
    samples = [feeds(rng) for _ in range(3)]
    path = testing.save(build(), tmp_path / "model.onnx")
    out = tmp_path / "q.onnx"
    qconvert.quantize(path, out, config=QuantizeConfig(scheme=scheme))
    assert testing.output_sqnr(path, out, samples) > 25.0


def test_fp16_keeps_float32_where_the_data_overflows_float16(tmp_path):
    """A layer whose outputs reach ~1e5 on real data: float16 would write inf there.

    (onnxruntime's CPU provider computes many float16 ops in float32 and may hide it; a GPU
    does not, so the check is on what runs in float16.)
    """
    rng = np.random.default_rng(0)
    model = _model(
        [
            h.make_node("MatMul", ["input", "w"], ["big"], name="expand"),
            h.make_node("Add", ["big", "b"], ["shifted"], name="shift"),
            h.make_node("Mul", ["shifted", "k"], ["small"], name="shrink"),
            h.make_node("MatMul", ["small", "w2"], ["output"], name="head"),
        ],
        [
            nh.from_array((rng.standard_normal((16, 16)) * 1e4).astype(np.float32), "w"),
            nh.from_array(np.full(16, 10.0, np.float32), "b"),
            nh.from_array(np.array(1e-4, np.float32), "k"),
            nh.from_array((rng.standard_normal((16, 4)) * 0.5).astype(np.float32), "w2"),
        ],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
    )
    samples = _samples((1, 16), 8)
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(tmp_path / "calib", samples)
    fp16 = QuantizeConfig(scheme="fp16")
    blind = qconvert.quantize(path, tmp_path / "blind.onnx", config=fp16)
    assert "expand" not in _float_reasons(blind)  # without data it would run in float16
    peak = max(
        float(np.abs(f["input"] @ nh.to_array(model.graph.initializer[0])).max())
        for f in samples
    )
    assert peak > 65504
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=calib, config=fp16)
    reasons = _float_reasons(report)
    assert reasons["expand"].startswith("'big' reaches ")
    assert "beyond float16's 65504: stays float32" in reasons["shift"]
    assert "head" not in reasons  # back in range: float16
    assert testing.output_sqnr(path, out, samples) > 40.0


def test_elementwise_ops_off_the_integer_chain_stay_float(tmp_path):
    """Add/Mul/... run quantized only between quantized values: one fed by float ops only,
    or read by float ops only, would just add Q/DQ pairs. (Mul after the MatMuls: an Add
    of a bias there would make one layer with the MatMul.)"""
    rng = np.random.default_rng(0)
    model = _model(
        [
            h.make_node("Exp", ["input"], ["e"], name="exp"),
            h.make_node("Add", ["e", "c"], ["a1"], name="add_after_float"),
            h.make_node("MatMul", ["a1", "w"], ["m1"], name="mm1"),
            h.make_node("Mul", ["m1", "c"], ["a2"], name="mul_before_float"),
            h.make_node("Erf", ["a2"], ["r"], name="erf"),
            h.make_node("MatMul", ["r", "w"], ["m2"], name="mm2"),
            h.make_node("Mul", ["m2", "c"], ["a3"], name="mul_in_chain"),
            h.make_node("MatMul", ["a3", "w"], ["output"], name="mm3"),
        ],
        [
            nh.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "w"),
            nh.from_array(np.linspace(-1, 1, 8, dtype=np.float32), "c"),
        ],
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8])],
    )
    samples = _samples((1, 8), 8)
    path, out, report = _quantize(model, tmp_path, samples)
    reasons = _float_reasons(report)
    assert reasons["add_after_float"] == "no quantized input flows into it: stays float"
    # mm1 writes its output in float (only the float chain reads it: `_writes_float`), so
    # no quantized value flows into the Mul either.
    assert reasons["mul_before_float"] == "no quantized input flows into it: stays float"
    assert "mul_in_chain" not in reasons
    assert report.conversion.quantized_ops == {"Mul": 1, "MatMul": 3}
    assert testing.optimized_ops(out, tmp_path)["QLinearMul"] == 1
    assert testing.output_sqnr(path, out, samples) > 25.0


def test_attention_mask_add_stays_float_and_keeps_the_softmax_sound(tmp_path):
    # scores + (1 - mask) * -10000: one scale for that sum would span the mask and round the
    # scores away, and the Softmax after it would see noise.
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        masked (float[N,4,8] x, float[N,1,8] mask) => (float[N,4,8] output) {
            scores = MatMul (x, w)
            keep = Sub (one, mask)
            penalty = Mul (keep, minus_big)
            masked_scores = Add (scores, penalty)
            probs = Softmax <axis = -1> (masked_scores)
            output = MatMul (probs, v)
        }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(a, n)
        for n, a in {
            "w": rng.standard_normal((8, 8)).astype(np.float32),
            "one": np.float32(1.0),
            "minus_big": np.float32(-10000.0),
            "v": rng.standard_normal((8, 8)).astype(np.float32),
        }.items()
    )
    path = testing.save(model, tmp_path / "masked.onnx")

    def sample(seed):
        r = np.random.default_rng(seed)
        mask = (r.random((1, 1, 8)) < 0.7).astype(np.float32)
        return {"x": r.standard_normal((1, 4, 8)).astype(np.float32), "mask": mask}

    samples = [sample(i) for i in range(32)]
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=calib, config=qconvert.QuantizeConfig())
    reasons = {n.op_type: n.reason for n in report.conversion.float_nodes}
    assert reasons["Add"].startswith("mixed-range Add")
    assert testing.output_sqnr(path, out, [sample(100 + i) for i in range(16)]) >= 20
