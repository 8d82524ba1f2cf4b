"""The calibrate stage of `quantize`, and the recipe's partial re-calibration.

`calibrate` runs the float model over the --data samples (less the held-out ones) and
keeps their statistics, leaving out the tensors no plan will read (`calibration.deferral`);
`recalibrate` measures again only the tensors a change to the float model moved.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qconvert.calibration import CollectSettings, tensors_to_calibrate
from qconvert.calibration.collect import KeptOutputs
from qconvert.calibration.deferral import deferrable_tensors
from qconvert.calibration.shards import DataSpec
from qconvert.pipelines.auto_check import AUTO_CHECK_SAMPLES
from qconvert.pipelines.calibrate import (
    calibration_model,
    collect_calibration,
    float16_peaks,
)
from qconvert.pipelines.stages import prepares_alike
from qconvert.pipelines.state import QuantizeState
from qconvert.schemes import StaticScheme
from qconvert.selection import NodeSelection
from qconvert.sensitivity import FloatOutputs


def calibrate(state: QuantizeState) -> QuantizeState:
    """Runs the float model over the samples: statistics, or fp16's magnitudes."""
    request, source = state.request, state.source
    if state.measuring:
        with request.progress.task("Measuring ranges", len(source)) as advance:
            return state.replace(peaks=float16_peaks(state.float_model, source, advance))
    # A state that has the model prepared as calibration runs it already (the recipe's
    # refit, where the scheme's preparation is calibration's) is not prepared again: on a
    # 224x224 residual CNN that was 46 MB of folded weights more under the session.
    calibrated = (
        state.calibrated.clone()
        if state.calibrated is not None
        else calibration_model(state.float_model.clone())
    )
    # Kept for the prepare stage before collecting, which may change the model it runs.
    kept = calibrated.clone() if prepares_alike(state.float_model, state.config) else None
    deferred = _deferred(state, calibrated)
    # `auto`'s check scores plans against the float outputs of the first samples: the
    # calibration session computes them anyway.
    outputs = (
        KeptOutputs(min(AUTO_CHECK_SAMPLES, len(source)))
        if state.range_method is not None and state.range_method.name == "auto"
        else None
    )
    calibration = collect_calibration(
        request.model,
        calibrated,
        source,
        _settings(state),
        request.progress,
        data=_data_spec(state),
        workers=request.workers,
        prepared=True,
        skip=deferred,
        kept=outputs,
        fingerprint=False,  # these statistics are never written to a file
    )
    runs = outputs.complete() if outputs is not None else None
    float_outputs = (
        FloatOutputs(
            sources=source.sources()[: outputs.samples], names=outputs.names, runs=tuple(runs)
        )
        if runs
        else None
    )
    return state.replace(
        calibration=calibration,
        calibrated=kept,
        deferred=deferred,
        float_outputs=float_outputs,
    )


def recalibrate(state: QuantizeState, tensors: frozenset[str]) -> QuantizeState:
    """Calibrates `tensors` of a changed float model; keeps the state's other statistics.

    For a change that leaves every other tensor's values as they were (equalization
    rescales only the tensors between its pairs): one float pass that reduces those few
    tensors, where calibrating afresh reduces them all, on the same samples.
    """
    request = state.request
    # A state that has the model prepared as calibration runs it already (the recipe's
    # refit, where the scheme's preparation is calibration's) is not prepared again: on a
    # 224x224 residual CNN that was 46 MB of folded weights more under the session.
    calibrated = (
        state.calibrated.clone()
        if state.calibrated is not None
        else calibration_model(state.float_model.clone())
    )
    kept = calibrated.clone() if prepares_alike(state.float_model, state.config) else None
    deferred = _deferred(state, calibrated)
    others = frozenset(tensors_to_calibrate(calibrated)) - (tensors - deferred)
    fresh = collect_calibration(
        request.model,
        calibrated,
        state.source,
        _settings(state),
        request.progress,
        data=_data_spec(state),
        # `--workers auto`: this process, a batch per core; a pass this small is not
        # worth spawning workers for.
        workers=None,
        prepared=True,
        skip=others | deferred,
        fingerprint=False,
    ).observers
    before = state.calibration.observers
    observers = {name: fresh.get(name, observer) for name, observer in before.items()}
    observers.update({name: fresh[name] for name in fresh if name not in before})
    calibration = dataclasses.replace(state.calibration, observers=observers)
    return state.replace(calibration=calibration, calibrated=kept, deferred=deferred)


def _deferred(state: QuantizeState, calibrated: ir.Model) -> frozenset[str]:
    """The tensors this run's calibration leaves out (`calibration.deferral`).

    None for symmetric activations, whose zero point cannot perform a Relu's clamp (every
    plan would read them), nor for mixed precision, which keeps clamps float by trial.
    A clamp the options keep float or override (`--exclude`, `--include-only`, per-node
    and per-tensor schemes) is known now to need its input's range, so that input is
    calibrated rather than found missing by the plan, which would calibrate again.
    """
    scheme, config = state.scheme, state.config
    if (
        not state.defer
        or state.mixed
        or not isinstance(scheme, StaticScheme)
        or scheme.activation_symmetric
        or scheme.activation_dtype.itemsize != 1
    ):
        return frozenset()
    selection = NodeSelection(exclude=config.exclude, include_only=config.include_only)
    overrides = config.overrides

    def planned_as_usual(clamp: ir.Node) -> bool:
        return (
            selection.skip_reason(clamp) is None
            and (clamp.name or "") not in overrides.nodes
            and not any(
                v.name in overrides.tensors for v in (*clamp.inputs, *clamp.outputs) if v
            )
        )

    return deferrable_tensors(
        calibrated, tensors_to_calibrate(calibrated), clamp_kept=planned_as_usual
    )


def _settings(state: QuantizeState) -> CollectSettings:
    """What calibration reduces: minmax needs no histogram, which makes it cheaper.

    The other methods (auto, the default, too) histogram exactly as `calibrate` does, so
    --data equals --calib.
    """
    if state.request.method == "minmax":
        return CollectSettings(histogram_values=0)
    return CollectSettings()


def _data_spec(state: QuantizeState) -> DataSpec:
    """Where workers read the samples from: the --data folder, less the held-out ones."""
    request = state.request
    return DataSpec(
        folder=str(request.data),
        specs=state.specs,
        images=request.images,
        limits=request.limits,
        held_out=state.held_out_indices,
    )
