"""`--size-budget`: int4 layers kept at 8 bits where their 4 bits cost most, within a file
size budget (`qconvert.int4_mix`); checked on graphs built here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qconvert
from qconvert import model as model_io
from qconvert import testing
from qconvert.config import QuantizeConfig
from qconvert.int4_mix import Candidate, choose, layer_bytes

WIDTH = 64


def _three_layers(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul w1 -> Relu -> MatMul w2 -> Relu -> MatMul w3, 64 wide.

    w2 holds one large value in every block of 32 along K: at 4 bits that value sets the
    block's step and the others round to 0 or one step, so w2's 4 bits cost the most.
    """
    rng = np.random.default_rng(seed)
    weights = {
        name: (rng.standard_normal((WIDTH, WIDTH)) * 0.15).astype(np.float32)
        for name in ("w1", "w2", "w3")
    }
    weights["w2"][::32, :] *= 12.0
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        three (float[N,{WIDTH}] x) => (float[N,{WIDTH}] y) {{
            a = MatMul (x, w1)
            b = Relu (a)
            c = MatMul (b, w2)
            d = Relu (c)
            y = MatMul (d, w3)
        }}
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        numpy_helper.from_array(array, name) for name, array in weights.items()
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, WIDTH)).astype(np.float32)} for _ in range(count)]


def test_choose_takes_the_best_gain_per_byte_that_still_fits():
    candidates = [
        Candidate("big", gain=9.0, extra_bytes=300),  # 0.03 a byte
        Candidate("small", gain=4.0, extra_bytes=100),  # 0.04 a byte: first
        Candidate("tiny", gain=0.5, extra_bytes=50),  # 0.01 a byte
        Candidate("useless", gain=0.0, extra_bytes=10),
    ]
    # 100 + 300 fit in 420; "tiny" (50) no longer does
    assert [c.node for c in choose(candidates, 420)] == ["small", "big"]
    # "big" does not fit in 250 - 100: passed over for "tiny"
    assert [c.node for c in choose(candidates, 250)] == ["small", "tiny"]
    assert choose(candidates, 40) == ()


@pytest.mark.parametrize("kernel", ["nbits", "int8"])
def test_layer_bytes_are_the_bytes_of_the_initializers_written(tmp_path, kernel):
    path = testing.save(_three_layers(), tmp_path / "model.onnx")
    overrides = tmp_path / "o.toml"
    prepared = _node_names(path)
    overrides.write_text(f'[nodes]\n"{prepared["c"]}" = "int8"\n')
    out = tmp_path / "out.onnx"
    config = QuantizeConfig(
        scheme="int4",
        int4_kernel=kernel,
        overrides=qconvert.overrides.load_overrides(overrides),
    )
    qconvert.quantize(path, out, config=config)
    quantized = onnx.load(out)
    written = sum(
        numpy_helper.to_array(t).nbytes
        for t in quantized.graph.initializer
        if t.data_type != onnx.TensorProto.INT64  # the int8 kernel's shape constants
    )
    expected = layer_bytes(WIDTH, WIDTH, bits=8, block_size=32, kernel=kernel) + 2 * (
        layer_bytes(WIDTH, WIDTH, bits=4, block_size=32, kernel=kernel)
    )
    if kernel == "int8":  # INT4 arrays read back one value a byte: count them packed
        written -= sum(
            numpy_helper.to_array(t).size // 2
            for t in quantized.graph.initializer
            if t.data_type == onnx.TensorProto.INT4
        )
    assert written == expected


def _node_names(path) -> dict[str, str]:
    """Output tensor name -> node name, as the int4 pipeline names them (`prepare`)."""
    from qconvert.passes import prepare

    prepared = prepare(model_io.load_model(path), min_opset=17)
    return {node.outputs[0].name: node.name for node in prepared.graph}


def _quantize(path, out, data, kernel, budget):
    config = QuantizeConfig(scheme="int4", int4_kernel=kernel, size_budget=budget)
    return qconvert.quantize(path, out, data=data, config=config)


@pytest.mark.parametrize("kernel", ["nbits", "int8"])
def test_the_costliest_layer_is_kept_at_8_bits_within_the_budget(tmp_path, kernel):
    model = _three_layers()
    path = testing.save(model, tmp_path / "model.onnx")
    data = testing.write_samples(tmp_path / "calib", _samples(16, seed=1))
    all4 = tmp_path / "all4.onnx"
    _quantize(path, all4, data, kernel, 0)
    float_bytes = model_io.file_size(path)
    # room for one layer at 8 bits (2 KiB more than at 4), not for two
    extra = layer_bytes(WIDTH, WIDTH, bits=8, block_size=32, kernel=kernel) - layer_bytes(
        WIDTH, WIDTH, bits=4, block_size=32, kernel=kernel
    )
    budget = 100 * (model_io.file_size(all4) + 1.5 * extra) / float_bytes
    out = tmp_path / "mixed.onnx"
    report = _quantize(path, out, data, kernel, budget)
    assert model_io.file_size(out) <= budget / 100 * float_bytes
    assert model_io.file_size(out) > model_io.file_size(all4)
    raised = _eight_bit_nodes(onnx.load(out), kernel)
    assert raised == ["c"]  # w2's MatMul
    names = _node_names(path)
    (row,) = [n for n in report.conversion.nodes if n.name == names["c"]]
    assert row.reason.startswith(f"8-bit weight kept within the {budget:g}% size budget")
    assert any(
        note.startswith(f"Size budget {budget:g}% of the float file: 1 layer(s) kept at 8")
        for note in report.conversion.notes
    )
    feeds = _samples(6, seed=9)
    assert testing.output_sqnr(model, out, feeds) > testing.output_sqnr(model, all4, feeds) + 3
    # the same inputs and options give the same bytes
    again = tmp_path / "again.onnx"
    _quantize(path, again, data, kernel, budget)
    assert again.read_bytes() == out.read_bytes()


def _eight_bit_nodes(quantized: onnx.ModelProto, kernel: str) -> list[str]:
    """Output names of the nodes whose weight is stored at 8 bits."""
    if kernel == "nbits":
        return [
            node.output[0]
            for node in quantized.graph.node
            if node.op_type == "MatMulNBits"
            and helper.get_attribute_value(next(a for a in node.attribute if a.name == "bits"))
            == 8
        ]
    int8 = {
        t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8
    }
    return [
        node.output[0]
        for node in quantized.graph.node
        if node.op_type == "DynamicQuantizeMatMul" and node.input[1] in int8
    ]


def test_a_budget_the_4_bit_file_already_fills_keeps_every_layer_at_4_bits(tmp_path):
    path = testing.save(_three_layers(), tmp_path / "model.onnx")
    data = testing.write_samples(tmp_path / "calib", _samples(16, seed=1))
    out = tmp_path / "out.onnx"
    report = _quantize(path, out, data, "nbits", 1.0)
    assert _eight_bit_nodes(onnx.load(out), "nbits") == []
    assert not any(note.startswith("Size budget") for note in report.conversion.notes)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--scheme", "int8", "--size-budget", "17"],
            "Error: --size-budget does not go with --scheme int8. Hint: it applies to "
            "--scheme int4 (blocked 4-bit weights).",
        ),
        (
            ["--scheme", "int4", "--size-budget", "120"],
            "Error: --size-budget 120 is out of range. Hint: give a percent of the float "
            "model's file size, 0 to 100 (0: all 4 bits).",
        ),
    ],
)
def test_size_budget_options_that_do_not_go_together_fail_with_one_line(
    tmp_path, run_cli, args, message
):
    path = testing.save(_three_layers(), tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "-o", out, *args)
    assert result.code == 2
    assert result.err.splitlines()[0] == message
    assert not out.exists()


def test_size_budget_without_data_fails_with_one_line(tmp_path, run_cli):
    path = testing.save(_three_layers(), tmp_path / "model.onnx")
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "-o", out, "--scheme", "int4", "--size-budget", "17")
    assert result.code == 2
    assert result.err.splitlines()[0] == (
        "Error: --size-budget needs --data: it ranks layers by their error on held-out "
        "samples. Hint: pass --data DIR, or leave --size-budget out."
    )
    assert len(result.err.splitlines()) == 1
    assert not out.exists()
    assert path.read_bytes() == before


def test_too_few_samples_to_hold_out_keep_every_layer_at_4_bits_and_say_so(tmp_path):
    path = testing.save(_three_layers(), tmp_path / "model.onnx")
    data = testing.write_samples(tmp_path / "calib", _samples(3, seed=1))
    out = tmp_path / "out.onnx"
    report = _quantize(path, out, data, "nbits", 50.0)
    assert _eight_bit_nodes(onnx.load(out), "nbits") == []
    assert (
        "Size budget not applied (too few samples to hold any out): every layer at the "
        "planned bits." in report.conversion.notes
    )


def test_a_model_in_external_data_keeps_every_layer_at_4_bits_and_says_so(tmp_path):
    (tmp_path / "ext").mkdir()
    path = testing.save_with_external_data(_three_layers(), tmp_path / "ext" / "m.onnx")
    data = testing.write_samples(tmp_path / "calib", _samples(8, seed=1))
    out = tmp_path / "out.onnx"
    report = _quantize(path, out, data, "nbits", 50.0)
    assert _eight_bit_nodes(onnx.load(out), "nbits") == []
    assert any(
        note.startswith("Size budget not applied (the model keeps its weights in external")
        for note in report.conversion.notes
    )
