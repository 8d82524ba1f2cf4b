"""Making the plan of the prepared model and applying it, for the quantize stages.

`plan_of` plans as the run's options say, `plan_raising` with the recipe's raises; both
stop the run when the plan reads a tensor calibration deferred (`calibration.deferral`).
`apply_plan` runs the rewriting passes, and `with_report_notes` adds what the report must
say about the plan (opsets, domains, speed).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qconvert.calibration.deferral import (
    RecordingRanges,
    watched,
)
from qconvert.config import Format, QuantizeConfig
from qconvert.passes import (
    CastToFloat16Pass,
    DynamicQuantizePass,
    FlattenChannelsLastPass,
    InsertQDQPass,
    LstmOnIntegersPass,
    PadOnIntegersPass,
    QDQToQOperatorPass,
    ResizeOnIntegersPass,
    StoreWeightsAsFloat16Pass,
)
from qconvert.pipelines.stages import (
    MICROSOFT_DOMAIN,
)
from qconvert.pipelines.state import (
    QuantizeState,
)
from qconvert.plan import QuantPlan, make_dynamic_plan, make_float16_plan, make_plan
from qconvert.schemes import INT16_MIN_OPSET, DynamicScheme, Float16Scheme, StaticScheme
from qconvert.selection import NodeSelection


def plan_raising(
    state: QuantizeState, ranges, raised: frozenset[str], excluded: frozenset[str]
) -> QuantPlan:
    """The static plan of the prepared model with `ranges` and the recipe's raises.

    `raised` nodes compute in float from int8-stored weights (`plan.static.RAISED_REASON`),
    `excluded` ones keep their float weights too.
    """
    seen = watched(ranges, state.deferred)
    plan = make_plan(
        state.prepared,
        state.scheme,
        seen,
        raised=raised,
        excluded=excluded,
        selection=state.selection,
        overrides=state.config.overrides,
        format=state.config.format.value,
        histograms=_histograms(state),
    )
    _check_deferred(seen)
    return plan


def plan_of(state: QuantizeState, ranges: dict) -> QuantPlan:
    """`plan_for_scheme` of the prepared model with `ranges`, as the state's options say."""
    seen = watched(ranges, state.deferred)
    plan = plan_for_scheme(
        state.prepared,
        state.scheme,
        state.config,
        state.selection,
        seen,
        state.peaks,
        histograms=_histograms(state),
    )
    _check_deferred(seen)
    return plan


def _histograms(state: QuantizeState):
    """The statistics `ranges` came from, for the plan rules that weigh a range by them."""
    return state.calibration.observers if state.calibration is not None else None


def _check_deferred(ranges) -> None:
    """Stops the run if a plan read a tensor calibration deferred (`RecordingRanges`)."""
    if isinstance(ranges, RecordingRanges):
        ranges.check()


def used_range_choices(choices: dict[str, str], plan: QuantPlan) -> dict[str, str]:
    """The `auto` choices of the tensors the plan quantizes as activations."""
    return {
        name: choices[name]
        for name, decision in plan.tensors.items()
        if name in choices and decision.role.value == "activation"
    }


def plan_for_scheme(
    model: ir.Model,
    scheme: StaticScheme | DynamicScheme | Float16Scheme,
    config: QuantizeConfig,
    selection: NodeSelection,
    ranges: dict,
    peaks: dict[str, float],
    *,
    histograms=None,
) -> QuantPlan:
    """The plan of `model` for a static, dynamic or float16 scheme.

    `histograms` are the calibration statistics behind `ranges` (`plan.static.make_plan`).
    """
    if isinstance(scheme, StaticScheme):
        return make_plan(
            model,
            scheme,
            ranges,
            selection=selection,
            overrides=config.overrides,
            format=config.format.value,
            histograms=histograms,
        )
    if isinstance(scheme, DynamicScheme):
        return make_dynamic_plan(
            model, scheme, selection=selection, overrides=config.overrides
        )
    return make_float16_plan(
        model, scheme, selection=selection, overrides=config.overrides, peaks=peaks
    )


def apply_plan(
    model: ir.Model, plan: QuantPlan, config: QuantizeConfig, qdq_domain: str
) -> ir.Model:
    """`model` rewritten by the passes of the plan's scheme (in place, and returned)."""
    scheme = plan.scheme
    if isinstance(scheme, StaticScheme):
        passes = [
            InsertQDQPass(plan=plan, domain=qdq_domain),
            PadOnIntegersPass(),
            ResizeOnIntegersPass(),
        ]
        if np.dtype(scheme.activation_dtype).itemsize == 1:
            # The integer LSTM quantizes X and H to 8 bits; a 16-bit scheme keeps it float.
            passes.append(LstmOnIntegersPass())
        if config.format is Format.QOP:
            passes.append(QDQToQOperatorPass())
        else:
            passes.append(FlattenChannelsLastPass())
    elif isinstance(scheme, DynamicScheme):
        passes = [DynamicQuantizePass(plan=plan)]
    elif scheme.storage_only:
        passes = [StoreWeightsAsFloat16Pass(plan=plan)]
    else:
        passes = [CastToFloat16Pass(plan=plan, keep_io_types=scheme.keep_io_types)]
    return ir.passes.PassManager(passes)(model).model


def with_report_notes(
    plan: QuantPlan,
    config: QuantizeConfig,
    opset_before: int,
    prepared: ir.Model,
    qdq_domain: str,
) -> QuantPlan:
    """Adds what the report must say about opsets, domains and speed."""
    notes = list(plan.notes)
    if not plan.tensors and not plan.float16_tensors and not plan.quantized_nodes():
        notes.append(
            f"Nothing to convert: --scheme {config.scheme} converts none of this model's "
            "nodes (each is listed with its reason); it is written unchanged in function."
        )
    opset_after = prepared.opset_imports.get("", 1)
    if opset_after != opset_before:
        notes.append(
            f"The model was upgraded from opset {opset_before} to {opset_after} with the "
            "ONNX version converter."
        )
    int16 = any(decision.qparams.dtype.itemsize == 2 for decision in plan.tensors.values())
    if int16:
        where = (
            f"onnxruntime's {MICROSOFT_DOMAIN} QuantizeLinear/DequantizeLinear (the upgrade "
            f"to opset {INT16_MIN_OPSET} failed)"
            if qdq_domain
            else f"standard ai.onnx QuantizeLinear/DequantizeLinear at opset {opset_after}"
        )
        notes.append(f"int16 activations use {where}.")
        notes.append(
            "onnxruntime has no int16 kernels on CPU: it dequantizes around every op, so "
            "16x8 runs slower than float there. It buys size and accuracy, not CPU speed."
        )
    if config.format is Format.QOP:
        notes.append(
            "qop: Conv, MatMul and Gemm groups are written as QLinearConv, QLinearMatMul "
            f"and {MICROSOFT_DOMAIN} QGemm, Add, Mul, Concat, pooling, LeakyRelu, Sigmoid "
            f"and Softmax as {MICROSOFT_DOMAIN} QLinear operators; groups that do not fit "
            "stay QDQ."
        )
    return dataclasses.replace(plan, notes=tuple(notes))
