"""--exclude, --include-only, --overrides, the VNNI warning, and the options' bad inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import qconvert
from qconvert import QuantizeConfig, testing
from qconvert.overrides import load_overrides
from qconvert.runtime import make_session


def _assert_clean_failure(result, code, out, *fragments):
    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _quantize(run_cli, model, tmp_path, *options):
    out = tmp_path / "out.onnx"
    return out, run_cli("quantize", model, "--data", tmp_path / "calib", "-o", out, *options)


def _float_ops(report) -> dict[str, str]:
    return {node.name: node.reason for node in report.conversion.float_nodes}


# --- exclusion and inclusion -------------------------------------------------------------


def test_exclude_by_op_type_leaves_those_nodes_float(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        tiny_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(exclude=("Gemm",))
    )
    ops = testing.count_ops(out)
    assert ops["Gemm"] == 1 and report.conversion.quantized_ops.get("Gemm") is None
    assert "excluded by --exclude 'Gemm'" in _float_ops(report).values()
    assert report.conversion.quantized_ops["Conv"] == 1


def test_exclude_by_glob_on_node_names(tiny_cnn, tmp_path):
    model = onnx.load_model(str(tiny_cnn))
    for node in model.graph.node:
        node.name = f"{'head' if node.op_type == 'Gemm' else 'features'}.{node.op_type}"
    onnx.save_model(model, str(tiny_cnn))
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        tiny_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(exclude=("features.*",))
    )
    assert report.conversion.quantized_ops == {"Gemm": 1}
    assert _float_ops(report)["features.Conv"] == "excluded by --exclude 'features.*'"


def test_include_only_converts_just_the_matching_nodes(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        tiny_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(include_only=("Gemm",))
    )
    assert set(report.conversion.quantized_ops) == {"Gemm"}
    assert "not matched by --include-only" in _float_ops(report).values()


def test_exclude_works_for_fp16_too(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    qconvert.quantize(tiny_cnn, out, config=QuantizeConfig(scheme="fp16", exclude=("Gemm",)))
    inits = {t.name: t.data_type for t in onnx.load_model(str(out)).graph.initializer}
    assert inits["fc_w"] == onnx.TensorProto.FLOAT


def test_exclude_matching_nothing_is_a_warning_not_silence(run_cli, tiny_cnn, tmp_path):
    out, result = _quantize(run_cli, tiny_cnn, tmp_path, "--exclude", "no_such_node")
    assert result.code == 0, result.err
    assert (
        "Warning: --exclude 'no_such_node' matches no node name or op type in the model."
        in result.err
    )
    assert out.exists()


# --- overrides ---------------------------------------------------------------------------


def test_override_file_toml_sets_a_node_float_and_a_tensor_int16(tiny_cnn, tmp_path):
    overrides = tmp_path / "mixed.toml"
    overrides.write_text('[nodes]\n"fc" = "float"\n[tensors]\n"input" = "int16"\n')
    model = onnx.load_model(str(tiny_cnn))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    if gemm.name != "fc":  # the builder's nodes are unnamed: name the Gemm
        gemm.name = "fc"
        onnx.save_model(model, str(tiny_cnn))
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        tiny_cnn,
        out,
        data=tmp_path / "calib",
        config=QuantizeConfig(overrides=load_overrides(overrides)),
    )
    assert _float_ops(report)["fc"] == f"set to float by {overrides}"
    inits = {t.name: t for t in onnx.load_model(str(out)).graph.initializer}
    assert inits["input_zp"].data_type == onnx.TensorProto.INT16
    assert report.conversion.opset_after == 21  # int16 needs opset 21
    assert (
        testing.output_sqnr(
            tiny_cnn, out, [testing.random_inputs(testing.conv_bn_relu(), seed=9)]
        )
        >= 25.0
    )


def test_override_file_json_puts_one_node_in_16x8(tmp_path):
    model = testing.matmul_add(k=16, n=8)
    model.graph.node[0].name = "proj"
    path = testing.save(model, tmp_path / "m.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    overrides = tmp_path / "mixed.json"
    overrides.write_text(json.dumps({"nodes": {"proj": "16x8"}}))
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        path,
        out,
        data=tmp_path / "calib",
        config=QuantizeConfig(overrides=load_overrides(overrides)),
    )
    # The Add of the bias runs inside the MatMul's layer.
    assert report.conversion.quantized_ops == {"MatMul": 1, "Add": 1}
    inits = {t.name: t.data_type for t in onnx.load_model(str(out)).graph.initializer}
    assert inits["input_zp"] == onnx.TensorProto.INT16
    assert report.conversion.opset_after == 21


@pytest.mark.parametrize(
    ("content", "suffix", "fragments"),
    [
        ('[nodes]\n"ghost" = "float"\n', ".toml", ("names node 'ghost'", "does not have")),
        ('[tensors]\n"phantom" = "int8"\n', ".toml", ("names tensor 'phantom'",)),
        (
            '{"nodes": {"x": "int3"}}',
            ".json",
            ("unknown scheme 'int3'", "float, int8, 16x8, int4"),
        ),
        ('{"tensors": {"x": "bf16"}}', ".json", ("unknown type 'bf16'",)),
        ('{"layers": {}}', ".json", ("unknown table 'layers'",)),
        ("[nodes\n", ".toml", ("could not be read",)),
    ],
    ids=[
        "unknown-node",
        "unknown-tensor",
        "unknown-scheme",
        "unknown-type",
        "bad-table",
        "bad",
    ],
)
def test_bad_override_file_exits_3(run_cli, tiny_cnn, tmp_path, content, suffix, fragments):
    overrides = tmp_path / f"overrides{suffix}"
    overrides.write_text(content)
    out, result = _quantize(run_cli, tiny_cnn, tmp_path, "--overrides", overrides)
    _assert_clean_failure(result, 3, out, str(overrides), *fragments)


def test_override_scheme_the_run_cannot_apply_exits_3(run_cli, tiny_cnn, tmp_path):
    model = onnx.load_model(str(tiny_cnn))
    name = model.graph.node[0].name = "first"
    onnx.save_model(model, str(tiny_cnn))
    overrides = tmp_path / "o.toml"
    overrides.write_text(f'[nodes]\n"{name}" = "16x8"\n')
    out = tmp_path / "out.onnx"
    result = run_cli(
        "quantize", tiny_cnn, "--scheme", "fp16", "--overrides", overrides, "-o", out
    )
    _assert_clean_failure(result, 3, out, "sets node 'first' to '16x8'", "--scheme fp16")


# --- the VNNI warning --------------------------------------------------------------------


def test_warns_without_vnni_unless_reduce_range(run_cli, tiny_cnn, tmp_path, monkeypatch):
    from qconvert.pipelines import quantize_stages as pipeline

    monkeypatch.setattr(pipeline, "lacks_vnni", lambda: True)
    _, result = _quantize(run_cli, tiny_cnn, tmp_path)
    assert result.code == 0
    assert "Warning: This CPU lacks VNNI" in result.err and "--reduce-range" in result.err
    _, result = _quantize(run_cli, tiny_cnn, tmp_path, "--reduce-range", "--force")
    assert result.code == 0 and "VNNI" not in result.err


def test_lacks_vnni_reads_the_cpu_flags(monkeypatch):
    from qconvert import cpu

    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert cpu.lacks_vnni()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert not cpu.lacks_vnni()
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())
    assert not cpu.lacks_vnni()


# --- incompatible options: usage errors (exit 2) that say what goes together ------------


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (
            ("--format", "qop", "--scheme", "fp16"),
            (
                "--format qop does not go with --scheme fp16",
                "use --format qop with --scheme int8 or int4, or --format qdq with "
                "--scheme fp16",
            ),
        ),
        (("--format", "qop", "--scheme", "16x8"), ("--format qop does not go with",)),
        (
            ("--scheme", "16x8", "--activation-type", "int8"),
            ("--activation-type does not go with --scheme 16x8", "16x8 activations are int16"),
        ),
        (("--scheme", "fp16", "--reduce-range"), ("--reduce-range does not go with",)),
        (
            ("--scheme", "int8-dynamic", "--symmetric-activations"),
            ("--symmetric-activations does not go with",),
        ),
        (("--scheme", "int8", "--no-keep-io-types"), ("--no-keep-io-types does not go",)),
        (
            ("--scheme", "16x8", "--opset", "17"),
            ("--opset 17 is too low for --scheme 16x8", "needs opset 21"),
        ),
        (("--opset", "3"), ("--opset 3 is out of range",)),
        (("--opset", "15"), ("--opset 15 is below the model's opset 17",)),
    ],
    ids=[
        "qop-fp16",
        "qop-16x8",
        "activation-type-16x8",
        "reduce-range-fp16",
        "symmetric-dynamic",
        "no-keep-io-int8",
        "opset-too-low-16x8",
        "opset-range",
        "opset-below-model",
    ],
)
def test_incompatible_options_are_usage_errors(
    run_cli, tiny_cnn, tmp_path, options, fragments
):
    out, result = _quantize(run_cli, tiny_cnn, tmp_path, *options)
    _assert_clean_failure(result, 2, out, *fragments)


def test_static_scheme_without_data_is_a_usage_error(run_cli, tiny_cnn, tmp_path):
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", tiny_cnn, "--scheme", "16x8", "-o", out)
    _assert_clean_failure(result, 2, out, "--scheme 16x8 needs calibration data")


@pytest.mark.parametrize("scheme", ["int8-dynamic", "fp16", "fp16-weights"])
def test_schemes_without_data_run_from_the_cli(run_cli, tiny_cnn, tmp_path, scheme):
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", tiny_cnn, "--scheme", scheme, "-o", out)
    assert result.code == 0, result.err
    assert out.exists()
    assert "note:" in result.out


# --- models that cannot be quantized: exit 3 ---------------------------------------------


def test_qdq_model_is_finished_not_quantized_again(run_cli, tiny_cnn, tmp_path):
    # A QDQ model is pre-quantized (tests/test_prequantized.py): its ranges are kept. Ours
    # stores its weights as integers already, so finishing it changes no value.
    quantized = tmp_path / "q.onnx"
    assert (
        run_cli("quantize", tiny_cnn, "--data", tmp_path / "calib", "-o", quantized).code == 0
    )
    out, result = _quantize(run_cli, quantized, tmp_path)
    assert result.code == 0, result.err
    assert "kept: --data: every Conv/Gemm/MatMul already has trained ranges" in result.out
    assert testing.count_ops(out) == testing.count_ops(quantized)
    feeds = testing.random_inputs(onnx.load(str(tiny_cnn)), seed=7)
    same = [make_session(str(p)).run(None, feeds)[0] for p in (quantized, out)]
    np.testing.assert_array_equal(*same)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "fp16"])
def test_already_quantized_dynamic_model_is_refused(run_cli, tiny_cnn, tmp_path, scheme):
    dynamic = tmp_path / "d.onnx"
    assert run_cli("quantize", tiny_cnn, "--scheme", "int8-dynamic", "-o", dynamic).code == 0
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", dynamic, "--scheme", scheme, "-o", out)
    _assert_clean_failure(result, 3, out, "is already quantized", "DynamicQuantizeLinear")


def test_non_float_model_is_refused(run_cli, tmp_path):
    path = testing.save(testing.integer_only(), tmp_path / "ints.onnx")
    testing.write_samples(tmp_path / "calib", [{"input": np.zeros((1, 4), np.int64)}])
    out, result = _quantize(run_cli, path, tmp_path)
    _assert_clean_failure(result, 3, out, "ints.onnx", "has no float32 tensors", "int64")


def test_opset_6_model_is_upgraded_not_refused(run_cli, tmp_path):
    model = testing.matmul_add(opset=17)
    model.opset_import[0].version = 6  # MatMul and Add exist at opset 6 too
    path = testing.save(model, tmp_path / "old.onnx")
    samples = [testing.random_inputs(model, seed=seed) for seed in range(4)]
    testing.write_samples(tmp_path / "calib", samples)
    out, result = _quantize(run_cli, path, tmp_path)
    # Opset 7's broadcast adapter (Add) reads every dim as a number: the dynamic batch
    # must be fixed first, as the refusal says.
    assert result.code == 3, result.err
    assert "fails on 'Add' at the step from opset 6 to 7" in result.err
    assert "Hint: fix the dynamic input dims with --input-shape" in result.err
    out, result = _quantize(run_cli, path, tmp_path, "--input-shape", "input:1x4x16")
    assert result.code == 0, result.err
    assert "upgraded from opset 6 to 13" in " ".join(result.out.split())
    assert testing.output_sqnr(testing.matmul_add(opset=17), out, samples) > 25


def test_scheme_help_says_16x8_is_slow_on_cpu(run_cli):
    result = run_cli("quantize", "--help")
    assert result.code == 0
    text = " ".join(result.out.split())
    assert "no int16 kernels on CPU, so it runs SLOWER than float there" in text
    for option in (
        "--format",
        "--exclude",
        "--include-only",
        "--overrides",
        "--opset",
        "--keep-io-types",
        "--reduce-range",
        "--activation-type",
    ):
        assert option in text
