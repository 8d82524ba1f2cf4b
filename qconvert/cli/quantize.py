"""`qconvert quantize`: write a quantized model and report what it cost."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from qconvert.cli import _console
from qconvert.cli._options import (
    given_options,
    image_options,
    image_preprocessing,
    limit_options,
    method_option,
    mlflow_options,
    percentile_option,
    workers_option,
)
from qconvert.limits import LoadLimits
from qconvert.schemes import SCHEMES

if TYPE_CHECKING:
    from qconvert.report import Report
    from qconvert.tracking import MlflowSettings

SCHEME_HELP = (
    "int8: uint8 activations calibrated on --data, int8 weights, int32 bias (fastest on "
    "CPU; LSTM, GRU and RNN run in float from int8-stored weights). 16x8: int16 "
    "activations, int8 weights, opset 21; closer to float than int8, "
    "but onnxruntime has no int16 kernels on CPU, so it runs SLOWER than float there. "
    "int8-dynamic: int8 MatMul/Gemm weights, activations quantized at run time, no data "
    "needed (transformers; LSTM too; Conv stays float). fp16: float16 weights and compute, "
    "float32 inputs/outputs. fp16-weights: float16 storage, float32 compute (for CPUs). "
    "int4: weight-only, MatMul/Gemm weights in 4-bit blocks along the reduction axis "
    "(--block-size), written as com.microsoft MatMulNBits by default; no data needed, "
    "with --data each layer keeps whichever of round-to-nearest, activation-aware clipping "
    "and GPTQ errs least on held-out samples."
)


@click.command("quantize", short_help="Quantize a float ONNX model.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write the quantized model. [default: MODEL.SCHEME.onnx beside MODEL]",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of calibration samples (see `qconvert calibrate --help` for layouts). "
    "int8 and 16x8 need it or --calib; every scheme verifies the written model on its "
    "first sample (without it: on zeros, or structurally where the float model cannot "
    "run on those; int4 of a model in external data: by an onnxruntime load, not a run). "
    "A model past 2 GB is calibrated with its weights left in its data files. With "
    "asymmetric activations, tensors only a Relu reads are left out (onnxruntime "
    "then fuses the Relu into the op before it); a plan that needs one calibrates "
    "every tensor again.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="A calibration file from `qconvert calibrate`, instead of --data.",
)
@method_option
@percentile_option
@image_options
@click.option(
    "--scheme",
    type=click.Choice(sorted(SCHEMES)),
    default="int8",
    show_default=True,
    help=SCHEME_HELP,
)
@click.option(
    "--format",
    "format_",
    type=click.Choice(["qdq", "qop"]),
    default=None,
    help="qdq: QuantizeLinear/DequantizeLinear around float ops (int4: INT4 weights behind "
    "blocked DequantizeLinear, opset 21). qop: integer operators (QLinearConv, "
    "QLinearMatMul, QGemm, QLinearAdd/Mul/Concat/AveragePool/Sigmoid/..., ConvInteger, "
    "MatMulInteger) for int8; com.microsoft MatMulNBits and GatherBlockQuantized for int4. "
    "[default: qop for int4, else qdq]",
)
@click.option(
    "--block-size",
    type=click.Choice(["32", "64", "128"]),
    default=None,
    help="int4: weights per block along the reduction axis, each block with its own "
    "scale. [default: 32]",
)
@click.option(
    "--asymmetric-weights",
    is_flag=True,
    help="int4: a zero point per block as well as a scale (else symmetric).",
)
@click.option(
    "--quantize-embeddings",
    is_flag=True,
    help="int4: also store the tables read by Gather (embeddings) in 4-bit blocks.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="int4 qop: MatMulNBits accuracy_level; 4 computes with int8 activations (fastest "
    "on CPU), 0 or 1 in float32 (exactly the dequantized weights). [default: 4]",
)
@click.option(
    "--int4-kernel",
    type=click.Choice(["nbits", "int8"]),
    default=None,
    help="int4 qop: nbits writes com.microsoft MatMulNBits; int8 stores the same 4-bit "
    "codes so that onnxruntime expands them to int8 at load and runs DynamicQuantizeMatMul "
    "(int8 GEMM, activations quantized per tensor: faster on CPU, 8-bit weights in memory). "
    "[default: int8 (without data its weights' block ranges are searched first, which "
    "makes up for its activation rounding); nbits with --asymmetric-weights, "
    "--accuracy-level, --opset below 21 or weights in external data]",
)
@click.option(
    "--scale-search",
    is_flag=True,
    help="int4: shrink each block's range to the least squared error before rounding "
    "(always done for the int8 kernel's weights without --data).",
)
@click.option(
    "--size-budget",
    type=float,
    default=None,
    metavar="PERCENT",
    help="int4 with --data: keep at 8 bits the layers whose 4-bit weights cost the most "
    "held-out output error per extra byte, while the file stays within this percent of "
    "the float model's; 0 keeps every layer at 4 bits. [default: 17]",
)
@click.option(
    "--activation-type",
    type=click.Choice(["uint8", "int8"]),
    default=None,
    help="int8 scheme: activation type. [default: uint8]",
)
@click.option(
    "--symmetric-activations",
    is_flag=True,
    help="Static schemes: zero point in the middle of each activation range.",
)
@click.option(
    "--per-channel/--per-tensor",
    default=True,
    show_default=True,
    help="One weight scale per output channel, or one per weight tensor.",
)
@click.option(
    "--reduce-range",
    is_flag=True,
    help="7-bit weights, for x86 CPUs without VNNI where u8 x s8 products can saturate "
    "(int8, int8-dynamic).",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Leave nodes float: a node name or op type, glob patterns allowed. Repeatable.",
)
@click.option(
    "--include-only",
    multiple=True,
    metavar="PATTERN",
    help="Convert only nodes whose name or op type matches. Repeatable.",
)
@click.option(
    "--overrides",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML or JSON file: [nodes] name = float|int8|16x8, [tensors] name = "
    "float|uint8|int8|int16 (mixed precision).",
)
@click.option(
    "--opset",
    type=int,
    default=None,
    help="Write this ai.onnx opset, upgrading the model with the ONNX version converter.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:DIMS",
    help="Fix a dynamic input's dims before planning, e.g. input:1x3x224x224. Repeatable.",
)
@click.option(
    "--keep-io-types/--no-keep-io-types",
    default=True,
    show_default=True,
    help="fp16: keep graph inputs and outputs float32.",
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of evaluation samples (labels.npy inside gives accuracy): compare the "
    "float and quantized models on it.",
)
@click.option(
    "--per-layer",
    is_flag=True,
    help="With --eval: also compare every intermediate tensor; the report then shows "
    "where the error comes from (per-layer SQNR in graph order, the worst ten named).",
)
@click.option(
    "--equalize",
    is_flag=True,
    help="Cross-layer equalization: even out the channel ranges of Conv -> Relu -> Conv "
    "pairs (depthwise-separable nets) before calibrating, and with --data the activation "
    "channels between a Conv (or constant Mul), directly or through a Relu, and the "
    "depthwise Convs or Muls that read them; the float function is unchanged.",
)
@click.option(
    "--bias-correction",
    is_flag=True,
    help="Shift each quantized Conv/Gemm bias by the mean error its quantized weights make "
    "on the --data samples.",
)
@click.option(
    "--adaround",
    is_flag=True,
    help="Round each MatMul/Gemm weight up or down to minimise its layer's output error on "
    "the --data samples, instead of to the nearest.",
)
@click.option(
    "--smooth-quant",
    type=click.FloatRange(0, 1),
    default=None,
    metavar="ALPHA",
    help="SmoothQuant: move activation outliers after LayerNormalization into the MatMul "
    "weights reading them (transformers); ALPHA in [0, 1], 0.5 is usual.",
)
@click.option(
    "--target-sqnr",
    type=float,
    default=None,
    metavar="DB",
    help="Mixed precision: keep the fewest, most sensitive nodes float until the output "
    "SQNR on --eval (else the first --data samples) is at least DB.",
)
@click.option(
    "--max-top1-drop",
    type=click.FloatRange(min=0),
    default=None,
    metavar="POINTS",
    help="Mixed precision: keep nodes float until top-1 accuracy on --eval (with "
    "labels.npy) drops by at most POINTS.",
)
@click.option(
    "--recipe",
    type=click.Choice(["default", "fast"]),
    default="default",
    show_default=True,
    help="default: with --data (at least 48 samples, or --eval), hold a quarter of the "
    "samples out (16 to 64), try reading an input whose values lie off the 8-bit grid in "
    "float, the other range method, bias correction, adaptive weight rounding and "
    "equalization in turn, keep each only where the held-out output SQNR (an output a "
    "Concat assembles, part by part: a detector's class scores beside its boxes, scores a "
    "Sigmoid writes as their logits; for a "
    "sequence of class distributions, a CTC recognizer's, the frames whose top-1 class "
    "agrees) improves overall and on most samples one by one (13 of 16: a sign test; bias "
    "correction and weight rounding on balance: 0.5 dB better overall, on as many samples "
    "as worse, and without the sample they help most; top-1 "
    "agreement may drop by one sample at most, by none below 97%), then raise the nodes "
    "that buy the most fidelity per multiply-accumulate (float compute on int8-stored "
    "weights; float weights too only where their rounding is the error; each gaining "
    "0.5 dB alone, and none that leans a classifier's scores toward some classes) while "
    "it is below --floor-sqnr, within --raise-budget, and refit the choices on all "
    "samples; "
    "the report tells what was tried and kept. fast: the single pass (plan, rewrite).",
)
@click.option(
    "--floor-sqnr",
    type=float,
    default=25.0,
    show_default=True,
    metavar="DB",
    help="Recipe default: raise nodes to float while the held-out output SQNR is below DB; "
    "for a classifier's outputs, while the top-1 agreement expected from its rows' "
    "margins is below 97%; for a sequence of class distributions, while "
    "fewer than 97% of the held-out sequences agree in every frame.",
)
@click.option(
    "--raise-budget",
    type=click.FloatRange(0, 100),
    default=5.0,
    show_default=True,
    metavar="PCT",
    help="Recipe default: the most of the model's multiply-accumulates that raised nodes "
    "(and the layers made float with them) may move to float kernels, and of its weight "
    "bytes they may store float, in percent.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the report to this file (.json, .md or .html).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout only.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option(
    "--junit",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="Also write the gates (--strict-kernels) as JUnit XML, one test case per gate "
    "(GitLab, Jenkins).",
)
@click.option(
    "--strict-kernels",
    is_flag=True,
    help="Exit 1 when onnxruntime leaves a float island (DequantizeLinear -> float op -> "
    "QuantizeLinear) the plan did not mean, or runs a node the plan keeps float (an "
    "excluded Relu) on the integers; the model and report are still written. "
    "The report's fusion audit lists every island either way.",
)
@workers_option(
    "Calibrate --data over N local processes, one onnxruntime thread each. auto: this "
    "process alone, running one batch per core (at most 8) at once on its one session. "
    "The model is the same however the work is split."
)
@limit_options
@mlflow_options
def quantize_command(
    model: Path,
    output: Path | None,
    data: Path | None,
    calib: Path | None,
    method: str,
    percentile: float,
    scheme: str,
    format_: str | None,
    block_size: str | None,
    asymmetric_weights: bool,
    quantize_embeddings: bool,
    accuracy_level: int | None,
    int4_kernel: str | None,
    scale_search: bool,
    size_budget: float | None,
    activation_type: str | None,
    symmetric_activations: bool,
    per_channel: bool,
    reduce_range: bool,
    exclude: tuple[str, ...],
    include_only: tuple[str, ...],
    overrides: Path | None,
    opset: int | None,
    keep_io_types: bool,
    input_shapes: tuple[str, ...],
    eval_data: Path | None,
    per_layer: bool,
    equalize: bool,
    bias_correction: bool,
    adaround: bool,
    smooth_quant: float | None,
    target_sqnr: float | None,
    max_top1_drop: float | None,
    recipe: str,
    floor_sqnr: float,
    raise_budget: float,
    report: Path | None,
    as_json: bool,
    force: bool,
    junit: Path | None,
    strict_kernels: bool,
    workers: int | None,
    limits: LoadLimits,
    mlflow: MlflowSettings | None,
    **image: object,
) -> None:
    """Quantize MODEL and write the result.

    Activation ranges come from --data (calibrated now) or --calib (a file written by
    `qconvert calibrate`), derived by --method.

    A model that already holds QuantizeLinear/DequantizeLinear pairs (a quantization-aware
    training export) is finished instead: every trained scale and zero point stays, weights
    are stored as integers behind their DequantizeLinear, and --data fills in only the
    Conv/Gemm/MatMul left without ranges. Fake quantization spelled out in float ops
    (Round/Clip/Mul) and integer operators are refused.

    The input model is never modified; the output is written only after it passes the ONNX
    checker and runs in onnxruntime (int4 of a model in external data without --data:
    loads in onnxruntime).

    In a GitHub Actions step (GITHUB_STEP_SUMMARY set), the Markdown report is appended
    to the job summary.
    """
    # deferred: onnxruntime is slow to import and --help is not
    import dataclasses

    from qconvert import api, ci
    from qconvert.cli._publish import publish  # deferred: it imports every stage
    from qconvert.config import QuantizeConfig, parse_input_shape
    from qconvert.overrides import load_overrides
    from qconvert.recipe_result import RecipeOptions
    from qconvert.tracking import log_report

    if junit is not None:
        ci.check_junit_path(junit)  # before any work, as compare does
    config = QuantizeConfig(
        scheme=scheme,
        format=format_,
        activation_type=activation_type,
        symmetric_activations=symmetric_activations,
        per_channel=per_channel,
        reduce_range=reduce_range,
        exclude=exclude,
        include_only=include_only,
        opset=opset,
        keep_io_types=keep_io_types,
        equalize=equalize,
        bias_correction=bias_correction,
        adaround=adaround,
        smooth_quant=smooth_quant,
        input_shapes=tuple(parse_input_shape(text) for text in input_shapes),
        block_size=int(block_size) if block_size is not None else None,
        asymmetric_weights=asymmetric_weights,
        quantize_embeddings=quantize_embeddings,
        accuracy_level=accuracy_level,
        int4_kernel=int4_kernel,
        scale_search=scale_search,
        size_budget=size_budget,
    )
    if overrides is not None:  # read after the options are known to go together
        config = dataclasses.replace(config, overrides=load_overrides(overrides))
    output = output if output is not None else model.with_suffix(f".{scheme}.onnx")
    progress = _console.BarProgress() if _console.interactive() and not as_json else None
    result = api.quantize(
        model,
        output,
        data=data,
        calib=calib,
        method=method,
        percentile=percentile,
        images=image_preprocessing(image),
        config=config,
        eval_data=eval_data,
        per_layer=per_layer,
        target_sqnr=target_sqnr,
        max_top1_drop=max_top1_drop,
        report=report,
        force=force,
        workers=workers,
        limits=limits,
        strict_kernels=strict_kernels,
        recipe=RecipeOptions(name=recipe, floor_sqnr_db=floor_sqnr, budget=raise_budget / 100),
        **({"progress": progress} if progress else {}),
    )

    def track(report: Report) -> None:
        log_report(
            report,
            mlflow,
            params={"method": method} if SCHEMES[scheme].needs_calibration else {},
            options=given_options(click.get_current_context()),
            fingerprints={"model": model, "data": data, "calib": calib, "eval": eval_data},
            model=output,
        )

    publish(result, as_json=as_json, junit=junit, track=track if mlflow is not None else None)
