"""`--scheme int4`: blocked 4-bit weights, checked against onnxruntime on graphs built here."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import qconvert
from qconvert import blockwise, nibbles, testing
from qconvert.blockwise import quantize_rtn
from qconvert.cli import cli as main
from qconvert.config import QuantizeConfig
from qconvert.errors import ConfigError
from qconvert.passes.int4 import gather as gather_writer


def _run(model, feeds, *, optimize: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


def _ids(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, 50, (3, 7)).astype(np.int64)}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _unpack(packed: np.ndarray) -> np.ndarray:
    """Low nibble first, as the MatMulNBits spec packs (written out here, not imported)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _dequantized_float_model(float_model: onnx.ModelProto, quantized: onnx.ModelProto):
    """The float model with each weight replaced by what the quantized model's integers
    and scales stand for, read from the MatMulNBits/GatherBlockQuantized inputs."""
    inits = _inits(quantized)
    weights: dict[str, np.ndarray] = {}
    float_nodes = {node.output[0]: node for node in float_model.graph.node}
    for node in quantized.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        original = float_nodes[node.output[0]]
        if node.op_type == "MatMulNBits":
            n, k, size = attrs["N"], attrs["K"], attrs["block_size"]
            codes = _unpack(inits[node.input[1]]).reshape(n, -1, size).astype(np.float32)
            scales = inits[node.input[2]].reshape(n, -1, 1)
            if len(node.input) > 3 and node.input[3]:
                zero = _unpack(inits[node.input[3]].reshape(n, -1))[:, : codes.shape[1]]
                zero = zero.astype(np.float32)[:, :, None]
            else:
                zero = np.float32(8)
            w_nk = ((codes - zero) * scales).reshape(n, -1)[:, :k]
            transposed = original.op_type == "Gemm"  # the builder's Gemm has transB
            weights[original.input[1]] = w_nk if transposed else w_nk.T
        elif node.op_type == "GatherBlockQuantized":
            data = inits[node.input[0]].astype(np.float32)
            size = attrs["block_size"]
            scales = np.repeat(inits[node.input[2]], size, axis=1)
            zero = (
                np.repeat(inits[node.input[3]].astype(np.float32), size, axis=1)
                if len(node.input) > 3
                else np.float32(0)
            )
            weights[original.input[0]] = (data - zero) * scales
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(float_model)
    for tensor in rebuilt.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(
                numpy_helper.from_array(weights[tensor.name].astype(np.float32), tensor.name)
            )
    assert len(weights) == 4
    return rebuilt


def test_symmetric_blocks_match_a_hand_computation():
    # peak 4 -> scale 4 / -8 = -0.5; codes round(w / -0.5) + 8
    weights = np.array([[1.0, -2.0, 0.5, 4.0]], dtype=np.float32)
    quantized = quantize_rtn(weights, block_size=4)
    assert quantized.scales.tolist() == [[-0.5]]
    assert quantized.codes.tolist() == [[6, 12, 7, 0]]
    assert quantized.dequantize().tolist() == [[1.0, -2.0, 0.5, 4.0]]
    # asymmetric: range [-2, 4] over 15 steps, zero point round(2 / 0.4) = 5
    quantized = quantize_rtn(weights, block_size=4, symmetric=False)
    assert np.isclose(quantized.scales[0, 0], 0.4)
    assert quantized.zero_points.tolist() == [[5]]
    # 1 / 0.4 is 2.49999996 in float32 (0.4 rounds up): code 2 + 5
    assert quantized.codes.tolist() == [[7, 0, 6, 15]]


@pytest.mark.parametrize(("block_size", "asymmetric"), [(32, False), (64, True)])
def test_matmul_nbits_equals_the_dequantized_float_model_bit_for_bit(
    tmp_path, block_size, asymmetric
):
    float_model = testing.embedding_mlp(d=128, hidden=96)
    path = testing.save(float_model, tmp_path / "model.onnx")
    out = tmp_path / "model.int4.onnx"
    config = QuantizeConfig(
        scheme="int4",
        block_size=block_size,
        asymmetric_weights=asymmetric,
        quantize_embeddings=True,
        accuracy_level=0,
    )
    qconvert.quantize(path, out, config=config)
    quantized = onnx.load(out)
    assert testing.count_ops(quantized) == {
        "GatherBlockQuantized": 1,
        "MatMulNBits": 3,
        "Add": 1,
        "Relu": 1,
        "ReduceMean": 1,
    }
    reference = _dequantized_float_model(float_model, quantized)
    # batches of rows: a single row takes onnxruntime's GEMV kernel, which sums in
    # another order than the GEMM both models use here
    for seed in (1, 2):
        got = _run(out, _ids(seed))[0]
        expected = _run(reference, _ids(seed))[0]
        np.testing.assert_array_equal(got, expected)
    assert testing.output_sqnr(float_model, out, [_ids(3)]) > 10  # four 4-bit layers


@pytest.mark.parametrize("asymmetric", [False, True])
def test_blocked_qdq_equals_matmul_nbits_within_float_rounding(tmp_path, asymmetric):
    path = testing.save(testing.embedding_mlp(), tmp_path / "model.onnx")
    outputs = {}
    for fmt in ("qop", "qdq"):
        out = tmp_path / f"model.{fmt}.onnx"
        config = QuantizeConfig(
            scheme="int4",
            format=fmt,
            asymmetric_weights=asymmetric,
            quantize_embeddings=True,
            accuracy_level=0 if fmt == "qop" else None,
        )
        qconvert.quantize(path, out, config=config)
        outputs[fmt] = _run(out, _ids(), optimize=fmt == "qop")[0]
    qdq = onnx.load(tmp_path / "model.qdq.onnx")
    assert qdq.opset_import[0].version >= 21
    blocked = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    assert len(blocked) == 4
    code_types = {
        t.data_type for t in qdq.graph.initializer if t.name in {n.input[0] for n in blocked}
    }
    assert code_types == {onnx.TensorProto.UINT4 if asymmetric else onnx.TensorProto.INT4}
    np.testing.assert_allclose(outputs["qdq"], outputs["qop"], rtol=1e-5, atol=1e-5)
    # onnxruntime fuses the blocked DequantizeLinear -> MatMul pairs into MatMulNBits
    fused = testing.optimized_ops(tmp_path / "model.qdq.onnx", tmp_path)
    assert fused["MatMulNBits"] == 2


def _layer_model(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        layer (float[N,{k}] x) => (float[N,{n}] y) {{
            y = MatMul (x, w)
        }}
    """
    model = onnx.parser.parse_model(text)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    return model


def _correlated(rng, mix, count: int, rows: int) -> list[dict[str, np.ndarray]]:
    return [
        {"x": (rng.standard_normal((rows, mix.shape[0])) @ mix).astype(np.float32)}
        for _ in range(count)
    ]


def test_gptq_lowers_the_layer_output_error_against_round_to_nearest(tmp_path):
    k, n = 128, 64
    rng = np.random.default_rng(0)
    # correlated inputs with a few strong directions: where error feedback pays
    mix = (rng.standard_normal((k, k)) * 0.3 + np.eye(k)).astype(np.float32)
    mix[:, :4] *= 8
    path = testing.save(_layer_model(k, n), tmp_path / "layer.onnx")
    data = testing.write_samples(tmp_path / "calib", _correlated(rng, mix, 12, 64))
    held_out = _correlated(np.random.default_rng(7), mix, 4, 64)
    errors = {}
    for name, folder in (("rtn", None), ("gptq", data)):
        out = tmp_path / f"layer.{name}.onnx"
        report = qconvert.quantize(
            path, out, data=folder, config=QuantizeConfig(scheme="int4", accuracy_level=0)
        )
        errors[name] = sum(
            float(np.sum((_run(out, s)[0] - _run(path, s)[0]) ** 2)) for s in held_out
        )
        if name == "gptq":
            assert any(
                "GPTQ on 1, AWQ-class activation-aware clipping on 0, round-to-nearest "
                "on 0 of 1" in note
                for note in report.conversion.notes
            )
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_exclude_and_an_8_bit_override_are_listed_with_their_reasons(tmp_path):
    path = testing.save(testing.embedding_mlp(), tmp_path / "model.onnx")
    overrides = tmp_path / "overrides.toml"
    prepared_names = _named(path, tmp_path)
    overrides.write_text(f'[nodes]\n"{prepared_names["h3"]}" = "int8"\n')
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(path),
            "-o",
            str(out),
            "--scheme",
            "int4",
            "--int4-kernel",
            "nbits",
            "--exclude",
            "Gemm",
            "--overrides",
            str(overrides),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    quantized = onnx.load(out)
    bits = sorted(
        helper.get_attribute_value(a)
        for n in quantized.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    )
    assert bits == [4, 8]
    assert testing.count_ops(quantized)["Gemm"] == 1
    assert "Gemm" in result.output and "excluded" in result.output
    assert "embedding table: stays float (pass --quantize-embeddings)" in result.output


def _named(path, tmp_path) -> dict[str, str]:
    """Node names as the prepared model has them (the builder leaves them empty)."""
    from qconvert import model as model_io
    from qconvert.passes import prepare

    prepared = prepare(model_io.load_model(path), min_opset=17)
    return {node.outputs[0].name: node.name for node in prepared.graph}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--scheme", "int8", "--block-size", "64"],
            "Error: --block-size does not go with --scheme int8. Hint: it applies to --scheme "
            "int4 (blocked 4-bit weights).",
        ),
        (
            ["--scheme", "int4", "--format", "qdq", "--accuracy-level", "4"],
            "Error: --accuracy-level does not go with --format qdq. Hint: it is an attribute "
            "of MatMulNBits, which --format qop writes.",
        ),
        (
            ["--scheme", "int8", "--int4-kernel", "int8"],
            "Error: --int4-kernel does not go with --scheme int8. Hint: it applies to "
            "--scheme int4 (blocked 4-bit weights).",
        ),
        (
            ["--scheme", "int4", "--format", "qdq", "--int4-kernel", "int8"],
            "Error: --int4-kernel does not go with --format qdq. Hint: it chooses the "
            "operator --format qop writes.",
        ),
        (
            ["--scheme", "int4", "--int4-kernel", "int8", "--asymmetric-weights"],
            "Error: --int4-kernel int8 does not go with --asymmetric-weights. Hint: its int8 "
            "GEMM reads symmetric weights; leave one of them out.",
        ),
        (
            ["--scheme", "int4", "--int4-kernel", "int8", "--accuracy-level", "4"],
            "Error: --accuracy-level does not go with --int4-kernel int8. Hint: it is an "
            "attribute of MatMulNBits; the int8 kernel always computes in int8.",
        ),
        (
            ["--scheme", "int4", "--per-tensor"],
            "Error: --per-tensor does not go with --scheme int4: its weights have one scale "
            "per block. Hint: choose the block with --block-size.",
        ),
    ],
)
def test_int4_options_that_do_not_go_together_fail_with_one_line(
    tmp_path, run_cli, args, message
):
    path = testing.save(testing.embedding_mlp(), tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "-o", out, *args)
    assert result.code == 2
    assert result.err.splitlines()[0] == message
    assert not out.exists()


def test_int4_refuses_a_calibration_file(tmp_path):
    path = testing.save(testing.embedding_mlp(), tmp_path / "model.onnx")
    calib = tmp_path / "c.json"
    calib.write_text("{}")
    with pytest.raises(ConfigError, match="does not read --calib"):
        qconvert.quantize(
            path, tmp_path / "o.onnx", calib=calib, config=QuantizeConfig(scheme="int4")
        )
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_model_gets_the_same_gptq_weights_as_one_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    mix = (rng.standard_normal((64, 64)) * 0.3 + np.eye(64)).astype(np.float32)
    model = _layer_model(64, 32)
    inline = testing.save(model, tmp_path / "inline.onnx")
    (tmp_path / "ext").mkdir()
    external = testing.save_with_external_data(model, tmp_path / "ext" / "layer.onnx")
    data = testing.write_samples(tmp_path / "calib", _correlated(rng, mix, 8, 32))
    outputs = {}
    for name, path in (("inline", inline), ("external", external)):
        out = tmp_path / f"{name}.int4.onnx"
        # the same kernel on both sides: by default only the inline one would take int8's
        config = QuantizeConfig(scheme="int4", int4_kernel="nbits")
        report = qconvert.quantize(path, out, data=data, config=config)
        assert any("Rounding chosen per weight" in note for note in report.conversion.notes)
        outputs[name] = _inits(onnx.load(out))
    assert (tmp_path / "external.int4.onnx.data").exists()
    assert outputs["inline"].keys() == outputs["external"].keys()
    for key, value in outputs["inline"].items():
        np.testing.assert_array_equal(value, outputs["external"][key])
    # compare reads both sides with their external data
    compared = qconvert.compare(external, tmp_path / "external.int4.onnx", data=data)
    assert compared.comparison.outputs[0].sqnr_db > 15


@pytest.mark.parametrize(
    ("scheme", "precision", "message"),
    [
        (
            "int4",
            "16x8",
            "which a --scheme int4 run cannot apply. Hint: in this scheme a "
            "node override is 'float', 'int4' or 'int8'.",
        ),
        (
            "int8",
            "int4",
            "which a --scheme int8 run cannot apply. Hint: int4 weights come "
            "from --scheme int4.",
        ),
    ],
)
def test_an_override_the_scheme_cannot_apply_exits_3(
    tmp_path, run_cli, scheme, precision, message
):
    model = _layer_model(64, 32)
    model.graph.node[0].name = "proj"
    path = testing.save(model, tmp_path / "layer.onnx")
    data = testing.write_samples(tmp_path / "calib", [{"x": np.ones((2, 64), np.float32)}] * 2)
    overrides = tmp_path / "o.toml"
    overrides.write_text(f'[nodes]\n"proj" = "{precision}"\n')
    out = tmp_path / "out.onnx"
    result = run_cli(
        "quantize", path, "-o", out, "--scheme", scheme, "--data", data,
        "--overrides", overrides,
    )  # fmt: skip
    assert result.code == 3
    assert result.err.strip() == (
        f"Error: Override file '{overrides}' sets node 'proj' to '{precision}', {message}"
    )
    assert not out.exists()


def test_activation_aware_clipping_lowers_held_out_layer_error_against_rtn():
    from qconvert.gptq import gram, layer_error

    rng = np.random.default_rng(5)
    k, n = 256, 64
    loud = np.ones(k, np.float32)
    loud[rng.choice(k, 8, replace=False)] = 20.0  # a few input channels dominate
    fit = rng.standard_normal((2048, k)).astype(np.float32) * loud
    held = rng.standard_normal((2048, k)).astype(np.float32) * loud
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    h_fit, h_held = gram(fit, k), gram(held, k)
    plain = quantize_rtn(w.T, block_size=32).dequantize().T
    clipped = (
        quantize_rtn(w.T, block_size=32, importance=np.diag(h_fit).astype(np.float32))
        .dequantize()
        .T
    )
    assert layer_error(w, clipped, h_held) < 0.9 * layer_error(w, plain, h_held)


def _nearest_by_hand(w_nk: np.ndarray, size: int, symmetric: bool):
    """Round-to-nearest written out block by block: (codes, scales, zero points)."""
    n, k = w_nk.shape
    blocks = -(-k // size)
    codes = np.full((n, blocks * size), 0, np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.uint8)
    for row in range(n):
        for b in range(blocks):
            block = w_nk[row, b * size : (b + 1) * size]
            high, low = np.float32(block.max()), np.float32(block.min())
            if symmetric:
                peak = high if abs(high) > abs(low) else low
                scale, zero = np.float32(peak / np.float32(-8)), 8
            else:
                low, high = min(low, np.float32(0)), max(high, np.float32(0))
                scale = np.float32((high - low) / np.float32(15))
                zero = 8 if scale == 0 else int(np.clip(np.round(-low / scale), 0, 15))
            step = np.rint(block / (scale if scale else np.float32(1))) + zero
            codes[row, b * size : b * size + block.size] = np.clip(step, 0, 15)
            codes[row, b * size + block.size : (b + 1) * size] = zero
            scales[row, b], zeros[row, b] = scale, zero
    return codes, scales, zeros


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("stored", ["K,N", "N,K"])
def test_round_to_nearest_in_small_chunks_of_either_layout_matches_the_hand_rule(
    monkeypatch, symmetric, stored, threads
):
    # MatMul weights are stored (K, N) and rounded in that layout; Gather tables (N, K).
    # Chunks of 64 values cut the weight into many pieces with ragged edges, shared out
    # among the threads: every thread count gives the hand rule's codes.
    monkeypatch.setattr(blockwise, "NEAREST_CHUNK_VALUES", 64)
    rng = np.random.default_rng(3)
    w_nk = rng.standard_normal((45, 70)).astype(np.float32)
    w_nk[3] = 0.0  # all-zero blocks get scale 0
    wt = w_nk if stored == "N,K" else np.ascontiguousarray(w_nk.T).T
    quantized = quantize_rtn(wt, block_size=16, symmetric=symmetric, threads=threads)
    codes, scales, zeros = _nearest_by_hand(w_nk, 16, symmetric)
    np.testing.assert_array_equal(quantized.codes, codes)
    np.testing.assert_array_equal(quantized.scales, scales)
    np.testing.assert_array_equal(quantized.zero_points, zeros)
    packed = blockwise.matmul_nbits_inputs(quantized)[0]
    np.testing.assert_array_equal(_unpack(packed).reshape(45, -1), codes)


@pytest.mark.parametrize("stored", ["K,N", "N,K"])
def test_edge_blocks_round_and_pack_as_the_hand_rule(stored):
    # Blocks whose peak is subnormal (its scale peak / -8 rounds, so a value may fall past
    # -8.5 steps), whose largest and smallest values tie in size, of zeros and of -0.0:
    # the packed symmetric bytes still equal the hand rule's codes.
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    rows = [
        np.arange(1, 33, dtype=np.float32) * tiny * -9 / 32,  # peak -9 subnormal steps
        np.arange(-16, 16, dtype=np.float32) * tiny,
        np.linspace(-1.0, 1.0, 32, dtype=np.float32),  # |max| == |min|
        np.zeros(32, np.float32),
        np.full(32, -0.0, np.float32),
        np.linspace(0.25, 3.0, 32, dtype=np.float32),
    ]
    w_nk = np.stack(rows * 3)[:, np.r_[0:32, 0:32]]  # 18 rows, two blocks each
    wt = w_nk if stored == "N,K" else np.ascontiguousarray(w_nk.T).T
    quantized = quantize_rtn(wt, block_size=32)
    codes, scales, _ = _nearest_by_hand(w_nk, 32, True)
    np.testing.assert_array_equal(quantized.scales, scales)
    packed = blockwise.matmul_nbits_inputs(quantized)[0]
    np.testing.assert_array_equal(packed.reshape(len(w_nk), -1), _pack_by_hand(codes))


def _pack_by_hand(codes: np.ndarray) -> np.ndarray:
    """Pairs along the last axis, the first in the low nibble (written out here)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("stored", ["K,N", "N,K"])
@pytest.mark.parametrize("k", [70, 96])  # a ragged last block of 32, and whole blocks
def test_codes_packed_inside_the_rounding_are_the_bytes_packed_afterwards(
    monkeypatch, symmetric, stored, k
):
    # The MatMulNBits and GatherBlockQuantized bytes of odd shapes (N odd, K ragged or not),
    # made chunk by chunk (64 values), equal the hand rule's codes packed as one array.
    monkeypatch.setattr(blockwise, "NEAREST_CHUNK_VALUES", 64)
    rng = np.random.default_rng(5)
    w_nk = rng.standard_normal((37, k)).astype(np.float32)
    wt = w_nk if stored == "N,K" else np.ascontiguousarray(w_nk.T).T
    quantized = quantize_rtn(wt, block_size=32, symmetric=symmetric)
    codes = _nearest_by_hand(w_nk, 32, symmetric)[0]
    assert quantized.code_array is None  # only the packed bytes are kept
    packed = blockwise.matmul_nbits_inputs(quantized)[0]
    np.testing.assert_array_equal(packed.reshape(37, -1), _pack_by_hand(codes))
    np.testing.assert_array_equal(quantized.codes, codes)
    if k % 32 == 0:  # a Gather table's rows are whole blocks
        dtype = ir.DataType.INT4 if symmetric else ir.DataType.UINT4
        flip = 0x88 if symmetric else 0
        table = gather_writer.gather_codes(quantized, dtype)
        np.testing.assert_array_equal(table, _pack_by_hand(codes).reshape(-1) ^ flip)


def test_int4_packing_flips_codes_to_twos_complement_nibbles():
    codes = np.array([[0, 15, 8, 7, 1]], np.uint8)  # an odd count pads with a zero nibble
    # INT4 values -8, 7, 0, -1, -7 -> nibbles 0x8, 0x7, 0x0, 0xF, 0x9
    assert nibbles.pack_nibbles(codes, flip=True).tolist() == [[0x78, 0xF0, 0x09]]
    assert nibbles.pack_nibbles(codes).tolist() == [[0xF0, 0x78, 0x01]]
    assert nibbles.pack_nibbles(codes.T, axis=0).T.tolist() == [[0xF0, 0x78, 0x01]]


@pytest.mark.parametrize("head", ["matmul", "gemm"])
def test_a_tied_output_projection_shares_the_tables_codes_and_equals_the_untied_model(
    tmp_path, monkeypatch, head
):
    path = testing.save(testing.tied_decoder(head=head), tmp_path / "model.onnx")
    config = QuantizeConfig(scheme="int4", quantize_embeddings=True, accuracy_level=0)
    tied = qconvert.quantize(path, tmp_path / "tied.onnx", config=config)
    # the same conversion with the tie not looked for: table and projection apart
    monkeypatch.setattr(
        "qconvert.plan.int4._tie_embeddings", lambda model, w, nodes, *a: (w, nodes, [])
    )
    untied = qconvert.quantize(path, tmp_path / "untied.onnx", config=config)

    model = onnx.load(tmp_path / "tied.onnx")
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    shared = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert [readers[t.name] for t in shared if "table" in t.name] == [
        {"GatherBlockQuantized", "MatMulNBits"}
    ]
    assert not any(t.name in ("table", "table_t") for t in model.graph.initializer)
    feeds = {"ids": np.random.default_rng(2).integers(0, 48, (2, 5)).astype(np.int64)}
    np.testing.assert_array_equal(
        _run(tmp_path / "tied.onnx", feeds)[0], _run(tmp_path / "untied.onnx", feeds)[0]
    )
    assert any("Tied embeddings" in note for note in tied.conversion.notes)
    assert not any("Tied embeddings" in note for note in untied.conversion.notes)
    # 48 x 64 codes are 1,536 bytes packed: stored once instead of twice
    tied_bytes = (tmp_path / "tied.onnx").stat().st_size
    assert tied_bytes < (tmp_path / "untied.onnx").stat().st_size - 1400


@pytest.mark.parametrize("tied", [True, False])
def test_a_tie_is_looked_for_in_external_data_and_only_where_the_values_match(tmp_path, tied):
    model = testing.tied_decoder()
    if not tied:  # the same shapes, another matrix: compared, then left apart
        for tensor in model.graph.initializer:
            if tensor.name == "table_t":
                values = numpy_helper.to_array(tensor).copy()
                values[0, 0] += 1.0
                tensor.CopyFrom(numpy_helper.from_array(values, "table_t"))
    path = testing.save_with_external_data(model, tmp_path / "model.onnx")
    config = QuantizeConfig(scheme="int4", quantize_embeddings=True)
    report = qconvert.quantize(path, tmp_path / "int4.onnx", config=config)
    notes = " ".join(report.conversion.notes)
    assert ("shares the 4-bit codes of table 'table'" in notes) is tied
    ops = testing.count_ops(str(tmp_path / "int4.onnx"))
    assert ops["MatMulNBits"] == 3 and ops["GatherBlockQuantized"] == 1
    assert ops["Reshape"] == (1 if tied else 0)
