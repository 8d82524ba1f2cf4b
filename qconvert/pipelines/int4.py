"""`quantize --scheme int4`: load -> prepare -> plan -> [Gram matrices] -> rewrite -> save.

Weight-only, so no activation ranges: the stages are its own. Weights in external data
stay on disk until the save writes the quantized tensors one by one (`passes.int4`), so a
model past 2 GB is converted holding about two weights at a time (the one written and the
next, `streaming`). With `--data`, the float model runs over the samples to sum each layer
input's X^T X (`int4_rounding`), one pass per bounded group of inputs (`int4_grams`); a
model in external data is handed to onnxruntime as its graph's bytes, the weights mapped
from its folder.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from qconvert import int4_grams
from qconvert import model as model_io
from qconvert.awq import ScaleChoice, choose_scale
from qconvert.compare import Side, compare_on_folder
from qconvert.config import Format, QuantizeConfig
from qconvert.dataset import DirectorySource, ImagePreprocessing, input_specs, synthetic_sample
from qconvert.errors import ConfigError, UnsupportedModelError
from qconvert.int4_grams import GroupedGrams
from qconvert.int4_mix import (
    DEFAULT_SIZE_BUDGET,
    MAX_HELD_SAMPLES,
    Candidate,
    choose,
    layer_bytes,
    output_gains,
    structure_bytes,
)
from qconvert.int4_options import DEFAULT_ACCURACY_LEVEL, default_int4_kernel
from qconvert.int4_rounding import HOLD_OUT_EVERY, GramSource, Rounder, accumulate_grams
from qconvert.layers import expose
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.passes import DropIntermediateShapesPass, prepare
from qconvert.passes.int4 import WriteBlockedWeightsPass
from qconvert.pipelines.stages import PathLike, timed
from qconvert.plan.decisions import NodeDecision
from qconvert.plan.int4 import Int4Plan, make_int4_plan
from qconvert.progress import SILENT, Progress
from qconvert.report import Conversion, Report, check_report_path
from qconvert.runtime import make_session
from qconvert.schemes import BLOCKED_DQ_MIN_OPSET, BlockedWeightScheme
from qconvert.selection import NodeSelection
from qconvert.verify import verify_loads, verify_model


def quantize_int4(
    model: PathLike,
    output: PathLike,
    *,
    config: QuantizeConfig,
    data: PathLike | None = None,
    calib: PathLike | None = None,
    images: ImagePreprocessing | None = None,
    eval_data: PathLike | None = None,
    per_layer: bool = False,
    mixed: bool = False,
    report: PathLike | None = None,
    force: bool = False,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> Report:
    """Writes `model` with blocked 4-bit weights as `config` says (see `api.quantize`)."""
    del progress  # the long step is the save, which reports nothing per tensor yet
    scheme = config.resolve_scheme()
    assert isinstance(scheme, BlockedWeightScheme)
    if calib is not None:
        raise ConfigError(
            "--scheme int4 does not read --calib: its rounding works from the layer inputs "
            "of the samples, which a calibration file does not hold.",
            hint="pass --data DIR (or neither, for round-to-nearest).",
        )
    if config.size_budget is not None and data is None:
        raise ConfigError(
            "--size-budget needs --data: it ranks layers by their error on held-out samples.",
            hint="pass --data DIR, or leave --size-budget out.",
        )
    if mixed:
        raise ConfigError(
            "--target-sqnr and --max-top1-drop do not go with --scheme int4.",
            hint="keep layers at 8 bits or float with --overrides or --exclude.",
        )
    output = model_io.check_output_path(output, force=force, source=model)
    if report is not None:
        check_report_path(report)
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        float_model = model_io.load_model(model, limits, keep_external=True)
        model_io.check_convertible(float_model, model)
        model_io.fix_input_shapes(float_model, config.input_shapes)
        external = model_io.uses_external_data(model)
        opset_before = float_model.opset_imports.get("", 1)
        if config.opset is not None and config.opset < opset_before:
            raise ConfigError(
                f"--opset {config.opset} is below the model's opset {opset_before}; "
                "qconvert only upgrades.",
                hint=f"pass --opset {opset_before} or later, or leave it out.",
            )
        if config.format is Format.QOP and config.int4_kernel is None:
            kernel = default_int4_kernel(config, external=external)
            config = dataclasses.replace(config, int4_kernel=kernel)
        specs = input_specs(float_model)
        source = DirectorySource(data, specs, images=images, limits=limits) if data else None
        evaluation = (
            DirectorySource(eval_data, specs, images=images, limits=limits)
            if eval_data is not None
            else None
        )
    with timed(timings, "prepare"):
        prepared = _prepare(float_model, config, external, model)
    selection = NodeSelection(exclude=config.exclude, include_only=config.include_only)
    selection.warn_unmatched(prepared.graph)
    with timed(timings, "plan"):
        int4 = make_int4_plan(
            prepared,
            scheme,
            format=config.format.value,
            selection=selection,
            overrides=config.overrides,
            quantize_embeddings=config.quantize_embeddings,
        )
    inputs = _layer_inputs(prepared, int4)
    grams = None
    if source is not None and inputs:
        with timed(timings, "gram matrices"):
            grams = _gram_matrices(prepared, model, external, inputs, source)
    tensors = {
        entry.weight: prepared.graph.initializers[entry.weight].const_value
        for entry in int4.weights
    }
    int8_grid = config.int4_kernel == "int8" and scheme.symmetric
    rounder = Rounder(
        tensors,
        block_size=scheme.block_size,
        symmetric=scheme.symmetric,
        search=config.scale_search,
        grams=grams,
        inputs=inputs,
        int8_grid=int8_grid,
    )
    kept: dict[str, np.ndarray] = {}
    # Searched for the int8 kernel only: there x / s also narrows the per-tensor range its
    # activations are quantized to. On MatMulNBits, a 6-layer sentence encoder's cosine
    # fell from 0.97418 to 0.97258 with the scales its layers kept, though each lowered
    # its held-out error.
    if grams is not None and grams.held_samples and int8_grid:
        with timed(timings, "input scales"):
            choices = _input_scales(int4, tensors, inputs, grams, scheme, int8_grid)
            # a scale the search found is kept only where the layer's chosen rounding
            # (GPTQ included) beats the same choice without it; that rounding is kept
            # for the save (held as one code a byte: a quarter of the weight's float size)
            entries = {entry.node: entry for entry in int4.weights}
            for node, choice in choices.items():
                if choice.scales is not None and rounder.settle_scale(entries[node], choice):
                    kept[node] = choice.scales
    budget = config.size_budget
    if budget is None:
        budget = DEFAULT_SIZE_BUDGET
    skipped = None
    if external:
        skipped = "the model keeps its weights in external data, read one at a time"
    elif grams is not None and not grams.held_samples:
        skipped = "too few samples to hold any out"
    if grams is not None and budget > 0 and skipped is not None:
        note = f"Size budget not applied ({skipped}): every layer at the planned bits."
        int4 = dataclasses.replace(
            int4, plan=dataclasses.replace(int4.plan, notes=(*int4.plan.notes, note))
        )
    elif grams is not None and budget > 0:
        with timed(timings, "size budget"):
            raised = _raise_within_budget(
                prepared,
                int4,
                rounder,
                kept,
                source,
                budget,
                model_io.file_size(model),
                config,
            )
            int4 = _with_raised(int4, raised, budget)
    level = config.accuracy_level
    level = DEFAULT_ACCURACY_LEVEL if level is None else level
    with timed(timings, "rewrite"):
        WriteBlockedWeightsPass(
            plan=int4,
            quantize=rounder,
            format=config.format.value,
            accuracy_level=level,
            kernel=config.int4_kernel or "nbits",
            input_scales=kept,
        )(prepared)
        DropIntermediateShapesPass()(prepared)
        prepared.producer_name = "qconvert"
        if external:
            _unmap_after_writing(prepared)
    feeds = source.first().feeds if source is not None else synthetic_sample(specs).feeds
    with timed(timings, "quantize and save"):
        converted = _verify_and_save(prepared, output, feeds, external, source is None)
    plan = _with_notes(int4, config, rounder, level, load_only=external and source is None)
    if isinstance(grams, GroupedGrams) and grams.passes > 1:
        plan = dataclasses.replace(plan, notes=(*plan.notes, _grams_note(grams)))
    comparison = None
    if evaluation is not None:
        with timed(timings, "evaluate"):
            comparison = compare_on_folder(
                Side(model=str(model), path=str(model), bytes=model_io.file_size(model)),
                Side(model=converted, path=str(output), bytes=model_io.file_size(output)),
                evaluation,
                per_layer=per_layer,
            )
    result = Report(
        command="quantize",
        model=str(model),
        output=str(output),
        conversion=Conversion.from_plan(
            plan,
            opsets=(opset_before, prepared.opset_imports.get("", 1)),
            sizes=(model_io.file_size(model), model_io.file_size(output)),
            samples=len(source) if source is not None else 0,
        ),
        comparison=comparison,
        seconds=timings,
    )
    if report is not None:
        result.write(report)
    return result


def _prepare(
    model: ir.Model, config: QuantizeConfig, external: bool, path: PathLike
) -> ir.Model:
    """The usual preparation for a model in memory; names only for one in external data.

    Preparation serializes the model (shape inference, the opset converter), which would
    read every external weight into memory at once.
    """
    target = config.target_opset
    if not external:
        return prepare(model, min_opset=target)
    if model.opset_imports.get("", 1) < target:
        raise UnsupportedModelError(
            f"Model '{path}' keeps its weights in external data and has opset "
            f"{model.opset_imports.get('', 1)}; blocked DequantizeLinear needs "
            f"{BLOCKED_DQ_MIN_OPSET}, and the opset converter would read every weight into "
            "memory.",
            hint="use --format qop with --int4-kernel nbits (MatMulNBits needs no opset "
            "upgrade).",
        )
    return NameFixPass()(model).model


def _input_scales(
    int4: Int4Plan,
    tensors: dict[str, ir.TensorProtocol],
    inputs: dict[str, str],
    grams: GramSource,
    scheme: BlockedWeightScheme,
    int8_grid: bool,
) -> dict[str, ScaleChoice]:
    """Per MatMul/Gemm of 4 bits, the AWQ-class input scale search's outcome (`awq`).

    A weight two planned nodes share is left unscaled: one rounding serves both.
    """
    uses = Counter(entry.weight for entry in int4.weights)
    choices = {}
    for entry in int4.weights:
        name = inputs.get(entry.node)
        if entry.op_type == "Gather" or entry.bits != 4 or uses[entry.weight] > 1:
            continue
        if name not in grams.fit or name not in grams.held:
            continue
        tensor = tensors[entry.weight]
        array = tensor.numpy()
        w = np.array(array.T if entry.transposed else array, dtype=np.float32, order="C")
        del array  # a memory-mapped weight unmaps only once no view of it is left
        release = getattr(tensor, "release", None)
        if release is not None:
            release()
        choices[entry.node] = choose_scale(
            w,
            grams.fit[name],
            grams.held[name],
            block_size=scheme.block_size,
            symmetric=scheme.symmetric,
            int8_grid=int8_grid,
        )
    return choices


def _raise_within_budget(
    prepared: ir.Model,
    int4: Int4Plan,
    rounder: Rounder,
    kept: dict[str, np.ndarray],
    source: DirectorySource,
    budget: float,
    float_bytes: int,
    config: QuantizeConfig,
) -> tuple[Candidate, ...]:
    """The layers kept at 8 bits within `budget` percent of the float file (`int4_mix`).

    Each candidate's chosen 4-bit rounding is held for the save; a raised layer's is
    dropped, with its input scale (`kept` loses it too).
    """
    scheme = int4.scheme
    kernel = config.int4_kernel or "nbits"
    uses = Counter(entry.weight for entry in int4.weights)
    shapes = {
        entry.weight: tuple(prepared.graph.initializers[entry.weight].const_value.shape)
        for entry in int4.weights
    }
    projected = float_bytes
    seen = set()
    for entry in int4.weights:
        if entry.weight in seen:  # one initializer read by several nodes is written once
            continue
        seen.add(entry.weight)
        n, k = shapes[entry.weight] if entry.transposed else shapes[entry.weight][::-1]
        projected -= 4 * n * k
        if entry.tied_to is None:  # a tied projection adds only its scales
            own = kernel if entry.op_type != "Gather" else "nbits"
            projected += layer_bytes(
                n,
                k,
                bits=entry.bits,
                block_size=scheme.block_size,
                kernel=own,
                symmetric=scheme.symmetric,
            )
            projected += structure_bytes(entry.weight, kernel=own)
    projected += sum(4 * scales.size for scales in kept.values())
    room = int(budget / 100 * float_bytes) - projected
    candidates = [
        entry
        for entry in int4.weights
        if entry.op_type != "Gather"
        and entry.bits == 4
        and entry.tied_to is None
        and uses[entry.weight] == 1
    ]
    if room <= 0 or not candidates:
        return ()
    extra = {}
    for entry in candidates:
        shape = shapes[entry.weight]
        n, k = shape if entry.transposed else shape[::-1]
        options = {"block_size": scheme.block_size, "kernel": kernel}
        extra[entry.node] = layer_bytes(n, k, bits=8, **options) - layer_bytes(
            n, k, bits=4, **options
        )

    def replacements() -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        for entry in candidates:
            values = rounder.hold(entry).dequantize()  # (N, K)
            if entry.node in kept:  # it stands for diag(s) W, read by x / s
                values = values / kept[entry.node][None, :]
            layout = values if entry.transposed else values.T
            yield entry.node, {entry.weight: np.ascontiguousarray(layout, np.float32)}

    held = [
        sample.feeds
        for index, sample in enumerate(source)
        if index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    ][:MAX_HELD_SAMPLES]
    gains = output_gains(
        ir.serde.serialize_model(prepared),
        replacements(),
        [entry.weight for entry in candidates],
        held,
    )
    chosen = choose((Candidate(node, gains[node], extra[node]) for node in gains), room)
    raised = {candidate.node for candidate in chosen}
    for entry in candidates:
        if entry.node in raised:
            rounder.forget(entry)
            kept.pop(entry.node, None)
    return chosen


def _with_raised(int4: Int4Plan, raised: tuple[Candidate, ...], budget: float) -> Int4Plan:
    """The plan with the raised layers at 8 bits, each listed with its reason."""
    if not raised:
        return int4
    by_node = {candidate.node: candidate for candidate in raised}
    total = sum(c.gain for c in raised)
    weights = tuple(
        dataclasses.replace(entry, bits=8) if entry.node in by_node else entry
        for entry in int4.weights
    )
    nodes = tuple(
        NodeDecision(
            decision.name,
            decision.op_type,
            True,
            f"8-bit weight kept within the {budget:g}% size budget: its 4 bits alone cost "
            f"{by_node[decision.name].gain:.3g} held-out output error, "
            f"+{by_node[decision.name].extra_bytes / 1024:.0f} KiB at 8",
        )
        if decision.name in by_node
        else decision
        for decision in int4.plan.nodes
    )
    listed = ", ".join(
        f"{c.node} ({c.gain:.3g}, +{c.extra_bytes / 1024:.0f} KiB)" for c in raised
    )
    note = (
        f"Size budget {budget:g}% of the float file: {len(raised)} layer(s) kept at 8 bits, "
        "those whose 4-bit weight alone adds the most held-out output error (relative "
        f"squared error summed over samples and outputs) per extra byte: {listed}; "
        f"together {total:.3g}."
    )
    plan = dataclasses.replace(int4.plan, nodes=nodes, notes=(*int4.plan.notes, note))
    return dataclasses.replace(int4, weights=weights, plan=plan)


def _unmap_after_writing(model: ir.Model) -> None:
    """Float weights left in external data are unmapped once written, one at a time.

    A memory-mapped tensor stays resident once read; copied and unmapped instead, the
    save holds one of them at a time.
    """
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.LazyTensor(
                _copy_and_release(tensor),
                dtype=tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
            )


def _copy_and_release(tensor: ir.ExternalTensor):
    def read() -> ir.TensorProtocol:
        array = np.array(tensor.numpy())
        tensor.release()
        return ir.Tensor(array, dtype=tensor.dtype, name=tensor.name)

    return read


def _layer_inputs(model: ir.Model, int4: Int4Plan) -> dict[str, str]:
    """Per planned MatMul/Gemm, the name of the input its weight multiplies."""
    nodes = {node.name: node for node in model.graph}
    return {
        entry.node: nodes[entry.node].inputs[0].name
        for entry in int4.weights
        if entry.op_type != "Gather" and nodes[entry.node].inputs[0] is not None
    }


def _gram_matrices(
    prepared: ir.Model,
    path: PathLike,
    external: bool,
    inputs: dict[str, str],
    source: DirectorySource,
) -> GroupedGrams:
    """X^T X of each layer input, summed over the samples by runs of the float model.

    One session serves every group (`int4_grams`); each group is one pass over the samples.
    """
    graph_inputs = {value.name for value in prepared.graph.inputs}
    names = sorted(set(inputs.values()))
    widths: dict[str, int] = {}
    nodes = {node.name: node for node in prepared.graph}
    for node_name, tensor in inputs.items():
        node = nodes[node_name]
        weight = node.inputs[1].const_value
        transposed = bool(node.attributes.get_int("transB", 0)) and node.op_type == "Gemm"
        widths[tensor] = int(weight.shape[1] if transposed else weight.shape[0])
    exposed = [name for name in names if name not in graph_inputs]
    if external:
        # the graph alone, as bytes; onnxruntime maps the weights from the model's folder
        proto = onnx.load_model(str(path), load_external_data=False)
        session = make_session(
            expose(proto, exposed), quiet=True, external_folder=Path(path).resolve().parent
        )
    else:
        session = make_session(expose(ir.serde.serialize_model(prepared), exposed), quiet=True)

    def runs(group: Mapping[str, int]) -> Iterator[dict[str, np.ndarray]]:
        wanted = [name for name in exposed if name in group]
        for sample in source:
            outputs = session.run(wanted, sample.feeds) if wanted else []
            values = dict(zip(wanted, outputs, strict=True))
            values.update({n: a for n, a in sample.feeds.items() if n in group})
            yield values

    # measured a bounded group of inputs at a time, as the rounding asks for them
    return GroupedGrams(
        lambda group: accumulate_grams(runs(group), group),
        widths,
        samples=len(source),
        budget=int4_grams.GRAM_BYTES,
    )


def _verify_and_save(
    converted: ir.Model, output: Path, feeds: dict, external: bool, synthetic: bool
) -> bytes | str:
    """Verifies on one sample and writes; returns the bytes, or the path (external data).

    On the zeros used without data, outputs may be NaN in float already (all-zero
    attention masks): then only that the model runs is checked, and for a model in
    external data only that it loads (`verify.verify_loads`).
    """
    feeds = {
        value.name: feeds[value.name]
        for value in converted.graph.inputs
        if value.name in feeds
    }
    outputs = frozenset(value.name for value in converted.graph.outputs)
    nonfinite = outputs if synthetic else frozenset()

    def verify(staged: bytes | str) -> None:
        verify_model(staged, feeds, nonfinite_in_float=nonfinite, audit=False)

    if external:
        # Without data the run would be on zeros whose outputs may be NaN anyway, and its
        # session reads and repacks every written weight (2.7 s of the 3 GB decoder's
        # conversion): the load alone checks what that run would have.
        check = verify_loads if synthetic else verify
        model_io.save_with_external_data(converted, output, verify=check)
        return str(output)
    converted_bytes = model_io.to_bytes(converted)
    verify(converted_bytes)
    model_io.write_atomically(output, converted_bytes)
    return converted_bytes


def _grams_note(grams: GroupedGrams) -> str:
    return (
        f"Layer-input Gram matrices measured a group at a time: {grams.passes} float "
        f"passes over the samples, holding at most {grams.peak_bytes / 2**20:.0f} MB of "
        f"them at once (of {grams.total_bytes / 2**20:.0f} MB for every input)."
    )


def _with_notes(
    int4: Int4Plan, config: QuantizeConfig, rounder: Rounder, level: int, *, load_only: bool
) -> object:
    notes = list(int4.plan.notes)
    if load_only:
        notes.append(
            "Verified by the ONNX checker and an onnxruntime load, without a run: the model "
            "keeps its weights in external data and no --data was given (pass --data to "
            "verify on a sample)."
        )
    if config.int4_kernel == "int8":
        notes.append(
            "qop, int8 kernel: MatMul/Gemm weights as INT4 codes with int8 block multipliers "
            "of one scale per column, expanded to int8 when onnxruntime loads the model, run "
            "by com.microsoft DynamicQuantizeMatMul (activations quantized per tensor on the "
            "fly); embedding tables as GatherBlockQuantized."
        )
    elif config.format is Format.QOP:
        compute = {0: "float32", 1: "float32", 2: "float16", 3: "bfloat16", 4: "int8"}[level]
        notes.append(
            "qop: MatMul/Gemm weights as com.microsoft MatMulNBits "
            f"(accuracy_level {level}: {compute} compute on CPU), embedding tables as "
            "GatherBlockQuantized."
        )
    else:
        notes.append(
            f"qdq: INT4/UINT4 weights behind blocked DequantizeLinear (opset "
            f"{BLOCKED_DQ_MIN_OPSET}); onnxruntime fuses them with MatMul into MatMulNBits."
        )
    rounding = rounder.note()
    if rounding is None:
        searched = config.scale_search or config.int4_kernel == "int8"
        kind = "with an MSE search of each block's scale" if searched else ""
        notes.append(f"Round-to-nearest {kind}".rstrip() + " (no --data).")
    else:
        notes.append(rounding)
    return dataclasses.replace(int4.plan, notes=tuple(notes))
