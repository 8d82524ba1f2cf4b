"""`quantize` of a pre-quantized model: load -> finish -> [fill in] -> [qop] -> verify -> save.

A model with QuantizeLinear/DequantizeLinear pairs (a QAT export) is finished, not
quantized again: its weights are stored as integers behind their DequantizeLinear, every
scale and zero point stays as trained (`qconvert.passes.finish_qdq`). With `--data`, the
Conv/Gemm/MatMul left float get ranges measured on the data (`qconvert.passes.fill_ranges`);
`--format qop` then writes integer operators. Verification runs the finished and the
pre-quantized model on the same samples: every output must agree within one quantization
step of that output (the scale of the DequantizeLinear it comes from).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, ShapeInferencePass

from qconvert import model as model_io
from qconvert import prequantized
from qconvert.compare import (
    CompareOptions,
    Comparison,
    Side,
    compare_models,
    folder_labels,
    load_labels,
)
from qconvert.config import Format, QuantizeConfig
from qconvert.dataset import DirectorySource, ImagePreprocessing, input_specs, synthetic_sample
from qconvert.errors import ConfigError, UnsupportedModelError, VerificationError
from qconvert.graph_utils import constant_array
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.passes import (
    DropIntermediateShapesPass,
    FlattenChannelsLastPass,
    QDQToQOperatorPass,
)
from qconvert.passes.fill_ranges import FillRangesPass, float_compute, missing_ranges
from qconvert.passes.finish_qdq import (
    FoldBatchNormIntoQuantizedPass,
    FoldClampIntoQuantizePass,
    PropagateRangePass,
    QuantizeBiasesPass,
    StandardQDQDomainPass,
    StoreQuantizedWeightsPass,
    TypeQuantizedValuesPass,
)
from qconvert.passes.prepare import FoldBatchNormPass, FoldConstantChainsPass
from qconvert.pipelines.stages import PathLike, timed
from qconvert.pipelines.state import QuantizeRequest
from qconvert.progress import SILENT, Progress
from qconvert.report import Conversion, Report, check_report_path
from qconvert.runtime import make_session
from qconvert.verify import verify_model

logger = logging.getLogger("qconvert")

CHECK_SAMPLES = 16
"""How many samples the finished model is checked against the pre-quantized one on."""


def applies(model: PathLike) -> bool:
    """True when `model` is finished rather than quantized (`prequantized.glance`)."""
    return prequantized.glance(model)


def finish(
    model: PathLike,
    output: PathLike,
    *,
    data: PathLike | None = None,
    calib: PathLike | None = None,
    images: ImagePreprocessing | None = None,
    config: QuantizeConfig | None = None,
    eval_data: PathLike | None = None,
    report: PathLike | None = None,
    force: bool = False,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
    unused: tuple[str, ...] = (),
) -> Report:
    """Finishes the pre-quantized `model` and writes `output` (see the module docstring).

    `unused` names the options the caller was given that do not apply here; each is
    refused as a usage error.
    """
    config = config if config is not None else QuantizeConfig()
    output = model_io.check_output_path(output, force=force, source=model)
    if report is not None:
        check_report_path(report)
    timings: dict[str, float] = {}
    ledger = prequantized.Ledger()
    with timed(timings, "load"):
        loaded = model_io.load_model(model, limits)
        prequantized.check_finishable(loaded, model)
        _check_options(config, calib, unused)
        model_io.fix_input_shapes(loaded, config.input_shapes)
        opset_before = loaded.opset_imports.get("", 1)
        specs = input_specs(loaded)
        source = DirectorySource(data, specs, images=images, limits=limits) if data else None
        evaluation = (
            DirectorySource(eval_data, specs, images=images, limits=limits)
            if eval_data is not None
            else None
        )
    with timed(timings, "finish"):
        finished = _finish(loaded, ledger)
    samples = 0
    if source is not None:
        with timed(timings, "fill in"):
            samples = _fill_in(finished, source, ledger)
    else:
        for node in float_compute(finished):
            ledger.kept.append(
                f"{node.op_type} '{node.name}' computes in float: its input has no trained "
                "range (pass --data to fill it in)"
            )
    if config.format is Format.QOP:
        with timed(timings, "rewrite"):
            StandardQDQDomainPass(ledger=ledger)(finished)
            QDQToQOperatorPass()(finished)
    else:
        if any(node.op_type == "Flatten" for node in finished.graph):
            # The Flatten rule reads its map's C, H and W; exporters write no shapes.
            ShapeInferencePass(check_type=False, strict_mode=False)(finished)
        FlattenChannelsLastPass()(finished)
    DropIntermediateShapesPass()(finished)
    finished.producer_name = "qconvert"
    with timed(timings, "verify"):
        converted = model_io.to_bytes(finished)
        checks = [s.feeds for s in _first(source or evaluation, CHECK_SAMPLES)]
        checks = checks or [synthetic_sample(specs).feeds]
        verify_model(converted, checks[0])
        if samples == 0:  # filled-in ops compute differently from the float they replace
            check_same_function(str(model), converted, finished, checks)
    with timed(timings, "save"):
        model_io.write_atomically(output, converted)
    comparison = None
    if evaluation is not None:
        with (
            timed(timings, "evaluate"),
            progress.task("Evaluating", len(evaluation)) as advance,
        ):
            comparison = _evaluate(model, output, converted, evaluation, advance)
    notes = [
        "The model was pre-quantized (QuantizeLinear/DequantizeLinear pairs): qconvert kept "
        "every trained scale and zero point and finished it instead of quantizing again."
    ]
    if samples:
        notes.append(
            f"Ranges the model lacked were measured on {samples} samples of --data "
            "(minmax); every other range is the trained one."
        )
    result = Report(
        command="quantize",
        model=str(model),
        output=str(output),
        conversion=Conversion(
            scheme=config.scheme,
            format=config.format.value,
            opset_before=opset_before,
            opset_after=finished.opset_imports.get("", 1),
            float_bytes=model_io.file_size(model),
            converted_bytes=model_io.file_size(output),
            calibration_samples=samples,
            quantized_ops=_quantized_ops(finished),
            folded_clamps=(),
            float_nodes=(),
            notes=tuple(notes),
            finished=tuple(ledger.finished),
            kept=tuple(ledger.kept),
            refused=tuple(ledger.refused),
        ),
        comparison=comparison,
        seconds=timings,
    )
    if report is not None:
        result.write(report)
    return result


def _check_options(
    config: QuantizeConfig, calib: PathLike | None, unused: tuple[str, ...]
) -> None:
    """Refuses the options that would change what the training chose."""
    hint = "finishing keeps the trained ranges; start from the float model to use it."
    if config.scheme != "int8":
        # The model, not the option, is what cannot take the scheme: a refusal (exit 3),
        # as for any model a scheme cannot convert.
        raise UnsupportedModelError(
            f"--scheme {config.scheme} does not apply to a pre-quantized model: its "
            "QuantizeLinear/DequantizeLinear pairs already fix the types.",
            hint="leave --scheme out (int8), or start from the float model.",
        )
    changes = [
        flag
        for flag, on in (
            ("--calib", calib is not None),
            ("--equalize", config.equalize),
            ("--bias-correction", config.bias_correction),
            ("--adaround", config.adaround),
            ("--smooth-quant", config.smooth_quant is not None),
            ("--exclude/--include-only", bool(config.exclude or config.include_only)),
            ("--activation-type", config.activation_type is not None),
            ("--symmetric-activations", config.symmetric_activations),
            ("--per-tensor", not config.per_channel),
            ("--reduce-range", config.reduce_range),
            ("--opset", config.opset is not None),
            ("--overrides", bool(config.overrides)),
        )
        if on
    ]
    changes += list(unused)
    if changes:
        raise ConfigError(f"{changes[0]} does not apply to a pre-quantized model.", hint=hint)


def _finish(model: ir.Model, ledger: prequantized.Ledger) -> ir.Model:
    """Runs the finishing passes in order (`qconvert.passes.finish_qdq`)."""
    batch_norms = sum(node.op_type == "BatchNormalization" for node in model.graph)
    passes = [
        NameFixPass(),  # the report names nodes; exporters may leave some unnamed
        FoldConstantChainsPass(),  # exporters share zero points through Identity nodes
        TypeQuantizedValuesPass(),
        StoreQuantizedWeightsPass(ledger=ledger),
        FoldBatchNormIntoQuantizedPass(ledger=ledger),
        FoldBatchNormPass(),  # a float weight's BatchNormalization: an ordinary fold
        FoldClampIntoQuantizePass(ledger=ledger),
        PropagateRangePass(ledger=ledger),
        QuantizeBiasesPass(ledger=ledger),
    ]
    model = ir.passes.PassManager(passes)(model).model
    folded = batch_norms - sum(node.op_type == "BatchNormalization" for node in model.graph)
    finished_folds = sum("BatchNormalization" in line for line in ledger.finished)
    if folded > finished_folds:
        ledger.finished.append(
            f"{folded - finished_folds} BatchNormalization folded into a float-weight "
            "Conv/Gemm"
        )
    return model


def _fill_in(model: ir.Model, source: DirectorySource, ledger: prequantized.Ledger) -> int:
    """Measures the ranges the model lacks on `source`, quantizes those ops; samples used."""
    names = [name for name in missing_ranges(model) if name]
    if not names:
        ledger.kept.append("--data: every Conv/Gemm/MatMul already has trained ranges")
        return 0
    probe = model.clone()
    values = {v.name: v for n in probe.graph for v in n.outputs}
    values.update({v.name: v for v in probe.graph.inputs})
    for name in names:
        if name in values and not values[name].is_graph_output():
            probe.graph.outputs.append(values[name])
    session = make_session(model_io.to_bytes(probe), quiet=True)
    wanted = [meta.name for meta in session.get_outputs() if meta.name in names]
    low = dict.fromkeys(wanted, np.inf)
    high = dict.fromkeys(wanted, -np.inf)
    count = 0
    for sample in source:
        for name, array in zip(wanted, session.run(wanted, sample.feeds), strict=True):
            low[name] = min(low[name], float(np.min(array)))
            high[name] = max(high[name], float(np.max(array)))
        count += 1
    ranges = {name: (low[name], high[name]) for name in wanted}
    FillRangesPass(ranges=ranges, ledger=ledger)(model)
    QuantizeBiasesPass(ledger=ledger)(model)
    return count


def _first(source: DirectorySource | None, count: int) -> list:
    if source is None:
        return []
    samples = []
    for sample in source:
        samples.append(sample)
        if len(samples) == count:
            break
    return samples


def check_same_function(
    original: str, converted: bytes, finished: ir.Model, feeds_list: list[dict]
) -> None:
    """The finished model's outputs equal the original's within one step on every sample.

    Raises:
        VerificationError: naming the output, the sample, the difference and the step.
    """
    reference, candidate = make_session(original), make_session(converted)
    steps = {value.name: _step(value) for value in finished.graph.outputs}
    names = [meta.name for meta in reference.get_outputs()]
    for index, feeds in enumerate(feeds_list):
        expected = reference.run(None, feeds)
        got = candidate.run(None, feeds)
        for name, a, b in zip(names, expected, got, strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            difference = float(np.max(np.abs(a - b), initial=0.0))
            step = steps.get(name, 0.0)
            allowed = step * 1.0001 + 1e-5 * float(np.max(np.abs(a), initial=1.0))
            if difference > allowed:
                raise VerificationError(
                    f"The finished model's output '{name}' differs from the pre-quantized "
                    f"model's by {difference:.4g} on check sample {index}, more than one "
                    f"quantization step ({step:.4g})."
                )


def _step(value: ir.Value) -> float:
    """One quantization step of an output: the scale of the nearest DQ it comes from."""
    seen = 0
    while value is not None and seen < 16:
        producer = value.producer()
        if producer is None:
            return 0.0
        if producer.op_type == "DequantizeLinear":
            scale = constant_array(producer.inputs[1])
            return float(np.max(scale)) if scale is not None else 0.0
        if producer.domain == "com.microsoft" and producer.op_type == "QGemm":
            return 0.0
        value = producer.inputs[0] if producer.inputs else None
        seen += 1
    return 0.0


def _quantized_ops(model: ir.Model) -> dict[str, int]:
    """Op types that read integers: through a DequantizeLinear or as integer operators."""
    counts: dict[str, int] = {}
    for node in model.graph:
        if prequantized.is_qdq(node):
            continue
        reads_dq = any(
            v is not None
            and v.producer() is not None
            and v.producer().op_type == "DequantizeLinear"
            for v in node.inputs
        )
        if reads_dq or node.op_type in prequantized.INTEGER_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _evaluate(
    model: PathLike, output: Path, converted: bytes, evaluation: DirectorySource, advance
) -> Comparison:
    """Compares the pre-quantized model with the finished one just written."""
    labels_path = folder_labels(evaluation.folder)
    labels = load_labels(labels_path, len(evaluation)) if labels_path else None
    return compare_models(
        Side(model=str(model), path=str(model), bytes=model_io.file_size(model)),
        Side(model=converted, path=str(output), bytes=model_io.file_size(output)),
        evaluation,
        len(evaluation),
        options=CompareOptions(
            labels=labels, labels_path=str(labels_path) if labels_path else None
        ),
        on_sample=advance,
    )


def finish_request(request: QuantizeRequest) -> Report:
    """`finish` with the arguments `quantize` was given (`QuantizeRequest`)."""
    unused = (
        ("--method", request.method != "auto"),
        ("--target-sqnr", request.target_sqnr is not None),
        ("--max-top1-drop", request.max_top1_drop is not None),
        ("--per-layer", request.per_layer),  # finishing compares the outputs only
    )
    return finish(
        request.model,
        request.output,
        data=request.data,
        calib=request.calib,
        images=request.images,
        config=request.config,
        eval_data=request.eval_data,
        report=request.report,
        force=request.force,
        progress=request.progress,
        limits=request.limits,
        unused=tuple(flag for flag, on in unused if on),
    )
