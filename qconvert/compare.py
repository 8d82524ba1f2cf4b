"""Run a reference and a candidate model on the same samples and measure the difference.

Samples stream through both models one at a time; per output, `metrics.OutputAccumulator`
keeps sums only, so memory does not depend on the number of samples. Alongside, optionally:

- accuracy against labels (one integer label per sample, scored on the first output: the
  prediction is the argmax of that output's values);
- per-layer metrics (`layers`), from a second pair of sessions with tensors exposed;
- the reference outputs written to a file (`saved_outputs`), or read from one in place of
  a reference model;
- latency of each model (`latency`), after the accuracy pass, on the first sample.

The reference is a model, or a saved reference run (`SavedOutputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qconvert.dataset import LABELS_FILE, Sample
from qconvert.errors import (
    AccuracyGateError,
    CalibrationDataError,
    ConfigError,
    ModelLoadError,
    ModelMismatchError,
)
from qconvert.latency import Latency, LatencyConfig, measure_latency
from qconvert.layers import LayerComparison, LayerMetrics
from qconvert.metrics import OutputAccumulator, OutputMetrics
from qconvert.runtime import describe_error, make_session
from qconvert.saved_outputs import OutputsWriter, SavedOutputs

CPU = "CPUExecutionProvider"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRun:
    """One side of a comparison: which model, how big, where it ran, what it scored."""

    path: str
    bytes: int | None
    provider: str
    accuracy: float | None = None
    latency: Latency | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """The outcome of running both models on the same samples."""

    samples: int
    reference: ModelRun
    candidate: ModelRun
    outputs: tuple[OutputMetrics, ...]
    labels: str | None = None
    layers: tuple[LayerMetrics, ...] | None = None

    @property
    def reference_accuracy(self) -> float | None:
        """Share of samples the reference classifies right (None without labels)."""
        return self.reference.accuracy

    @property
    def candidate_accuracy(self) -> float | None:
        """Share of samples the candidate classifies right (None without labels)."""
        return self.candidate.accuracy

    @property
    def accuracy_drop_points(self) -> float | None:
        """Reference accuracy minus candidate accuracy, in percentage points."""
        if self.reference.accuracy is None or self.candidate.accuracy is None:
            return None
        return 100.0 * (self.reference.accuracy - self.candidate.accuracy)

    @property
    def size_ratio(self) -> float | None:
        """Candidate bytes over reference bytes."""
        if not self.reference.bytes or self.candidate.bytes is None:
            return None
        return self.candidate.bytes / self.reference.bytes

    @property
    def latency_ratio(self) -> float | None:
        """Candidate median latency over reference median latency."""
        if self.reference.latency is None or self.candidate.latency is None:
            return None
        if self.reference.latency.median_ms == 0.0:
            return None
        return self.candidate.latency.median_ms / self.reference.latency.median_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class Side:
    """A model to run: its bytes or path, how it is named in reports, and its provider."""

    model: bytes | str
    path: str
    bytes: int | None
    provider: str = CPU


@dataclass(frozen=True, slots=True, kw_only=True)
class CompareOptions:
    """What to measure besides the output metrics.

    Attributes:
        labels: one integer label per sample, for accuracy.
        labels_path: where the labels came from, for the report.
        check_finite: fail on the first NaN or Inf in either model's outputs.
        per_layer: also compare matching intermediate tensors.
        latency: measure latency as configured (None: do not).
        save_outputs: write the reference outputs to this file.
    """

    labels: np.ndarray | None = None
    labels_path: str | None = None
    check_finite: bool = False
    per_layer: bool = False
    latency: LatencyConfig | None = None
    save_outputs: Path | None = None


def load_labels(path: str | Path, samples: int) -> np.ndarray:
    """Reads one integer label per sample from a `.npy` file.

    Raises:
        CalibrationDataError: the file is missing, unreadable, not integers or of a length
            other than `samples`.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"Labels file '{path}' does not exist.")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CalibrationDataError(
            f"Labels file '{path}' could not be read: {str(exc).splitlines()[0]}"
        ) from None
    if not np.issubdtype(labels.dtype, np.integer):
        raise CalibrationDataError(
            f"Labels file '{path}' holds {labels.dtype} values; labels must be integers."
        )
    labels = labels.reshape(-1)
    if labels.size != samples:
        raise CalibrationDataError(
            f"Labels file '{path}' holds {labels.size} labels for {samples} samples."
        )
    return labels


def folder_labels(folder: str | Path) -> Path | None:
    """The folder's `labels.npy`, or None if it has none."""
    path = Path(folder) / LABELS_FILE
    return path if path.exists() else None


def check_interfaces(
    reference: ir.Model | SavedOutputs,
    candidate: ir.Model,
    *,
    names: tuple[str, str],
) -> None:
    """Fails unless both models take the same inputs and give the same outputs.

    Raises:
        ModelMismatchError: naming both models and what differs.
    """
    cand_outputs = [output.name for output in candidate.graph.outputs]
    if isinstance(reference, SavedOutputs):
        ref_outputs = reference.outputs
    else:
        ref_inputs = _real_inputs(reference)
        cand_inputs = _real_inputs(candidate)
        if sorted(ref_inputs) != sorted(cand_inputs):
            raise ModelMismatchError(
                f"Models '{names[0]}' and '{names[1]}' take different inputs: "
                f"{_listing(ref_inputs)} vs {_listing(cand_inputs)}."
            )
        ref_outputs = [output.name for output in reference.graph.outputs]
    if len(ref_outputs) != len(cand_outputs):
        raise ModelMismatchError(
            f"Models '{names[0]}' and '{names[1]}' give {len(ref_outputs)} and "
            f"{len(cand_outputs)} outputs: "
            f"{_listing(ref_outputs)} vs {_listing(cand_outputs)}."
        )
    if ref_outputs != cand_outputs:
        raise ModelMismatchError(
            f"Models '{names[0]}' and '{names[1]}' name their outputs differently: "
            f"{_listing(ref_outputs)} vs {_listing(cand_outputs)}."
        )


def compare_models(
    reference: Side | SavedOutputs,
    candidate: Side,
    samples: Iterable[Sample],
    count: int,
    *,
    options: CompareOptions = CompareOptions(),
    on_sample: Callable[[], None] | None = None,
) -> Comparison:
    """Measures the candidate against the reference on every sample (see the module doc)."""
    saved = reference if isinstance(reference, SavedOutputs) else None
    reference_session = None if saved else _session(reference, "reference")
    candidate_session = _session(candidate, "candidate")
    names = [output.name for output in candidate_session.get_outputs()]
    layers = _PerLayer(reference, candidate) if options.per_layer else None
    writer = (
        OutputsWriter(
            options.save_outputs,
            model=reference.path,
            model_bytes=reference.bytes or 0,
            outputs=names,
        )
        if options.save_outputs is not None and not saved
        else None
    )
    accumulators = [OutputAccumulator(name) for name in names]
    hits = [0, 0]
    first: Sample | None = None
    try:
        for index, sample in enumerate(samples):
            first = first or sample
            if saved is not None:
                _check_saved_sample(saved, index, sample)
                expected = saved.read(index)
            else:
                expected = _run(reference_session, None, sample, "reference")
            actual = _run(candidate_session, None, sample, "candidate")
            if options.check_finite:
                _check_finite(expected, names, sample, "reference")
                _check_finite(actual, names, sample, "candidate")
            for accumulator, ref, cand in zip(accumulators, expected, actual, strict=True):
                _check_shapes(accumulator.name, ref, cand, sample)
                accumulator.update(ref, cand)
            if options.labels is not None:
                for side, outputs in enumerate((expected, actual)):
                    prediction = np.argmax(np.asarray(outputs[0]).reshape(-1))
                    hits[side] += int(prediction == options.labels[index])
            if layers is not None:
                layers.add(sample)
            if writer is not None:
                writer.add(sample.source, expected)
            if on_sample is not None:
                on_sample()
        if saved is not None and count != len(saved.samples):
            raise CalibrationDataError(
                f"Saved outputs file '{saved.path}' holds {len(saved.samples)} samples; "
                f"the data folder holds {count}."
            )
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise

    latencies: list[Latency | None] = [None, None]
    if options.latency is not None and first is not None:
        if not saved:
            latencies[0] = _latency(reference, first, options.latency)
        latencies[1] = _latency(candidate, first, options.latency)
    accuracies = [
        hit / count if options.labels is not None and count else None for hit in hits
    ]
    return Comparison(
        samples=count,
        reference=(
            ModelRun(
                path=saved.model,
                bytes=saved.model_bytes,
                provider=f"saved outputs '{saved.path}'",
                accuracy=accuracies[0],
            )
            if saved is not None
            else ModelRun(
                path=reference.path,
                bytes=reference.bytes,
                provider=reference.provider,
                accuracy=accuracies[0],
                latency=latencies[0],
            )
        ),
        candidate=ModelRun(
            path=candidate.path,
            bytes=candidate.bytes,
            provider=candidate.provider,
            accuracy=accuracies[1],
            latency=latencies[1],
        ),
        outputs=tuple(accumulator.result() for accumulator in accumulators),
        labels=options.labels_path,
        layers=layers.result() if layers is not None else None,
    )


class _PerLayer:
    """The three sessions of a per-layer comparison (see `layers`), fed one sample a time."""

    def __init__(self, reference: Side | SavedOutputs, candidate: Side) -> None:
        if isinstance(reference, SavedOutputs):
            raise ConfigError("--per-layer needs the reference model, not --load-outputs.")
        self.layers = LayerComparison(_proto(reference), _proto(candidate))
        self.reference = _session(reference, "reference", self.layers.reference_model)
        self.candidate = _session(candidate, "candidate", self.layers.candidate_model)
        self.isolated = _session(candidate, "candidate", self.layers.isolated_model)

    def add(self, sample: Sample) -> None:
        layers = self.layers
        inside = _run(self.reference, layers.reference_names, sample, "reference")
        cut_sample = Sample(sample.source, layers.isolated_feeds(sample.feeds, inside))
        layers.update(
            inside,
            _run(self.candidate, layers.candidate_names, sample, "candidate"),
            _run(self.isolated, layers.candidate_names, cut_sample, "candidate"),
        )

    def result(self) -> tuple[LayerMetrics, ...]:
        return self.layers.result()


def compare_on_folder(
    reference: Side,
    candidate: Side,
    evaluation,
    *,
    per_layer: bool = False,
    on_sample: Callable[[], None] | None = None,
) -> Comparison:
    """`compare_models` on every sample of an evaluation folder, with its labels if any.

    The labels are the folder's own (`folder_labels`): how `quantize --eval` scores the
    model it wrote.
    """
    labels_path = folder_labels(evaluation.folder)
    labels = load_labels(labels_path, len(evaluation)) if labels_path else None
    return compare_models(
        reference,
        candidate,
        evaluation,
        len(evaluation),
        options=CompareOptions(
            labels=labels,
            labels_path=str(labels_path) if labels_path else None,
            per_layer=per_layer,
        ),
        on_sample=on_sample,
    )


def _session(side: Side, role: str, model: bytes | None = None):
    try:
        return make_session(
            side.model if model is None else model, provider=side.provider, spin=False
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many unrelated types
        raise ModelLoadError(
            f"onnxruntime cannot load the {role} model '{side.path}': {describe_error(exc)}"
        ) from None


def _latency(side: Side, sample: Sample, config: LatencyConfig) -> Latency:
    try:
        session = make_session(side.model, threads=config.threads, provider=side.provider)
    except Exception as exc:  # noqa: BLE001 - as in _session
        raise ModelLoadError(
            f"onnxruntime cannot load the model '{side.path}': {describe_error(exc)}"
        ) from None
    return measure_latency(session, sample.feeds, config)


def _run(session, names: list[str] | None, sample: Sample, role: str) -> list[np.ndarray]:
    try:
        return session.run(names, sample.feeds)
    except Exception as exc:  # noqa: BLE001 - as in _session
        raise CalibrationDataError(
            f"onnxruntime failed to run the {role} model on sample '{sample.source}': "
            f"{describe_error(exc)}"
        ) from None


def _proto(side: Side) -> onnx.ModelProto:
    if isinstance(side.model, bytes):
        return onnx.load_model_from_string(side.model)
    return onnx.load_model(side.model)


def _check_finite(
    arrays: list[np.ndarray], names: list[str], sample: Sample, role: str
) -> None:
    for name, array in zip(names, arrays, strict=True):
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise AccuracyGateError(
                f"check-finite: the {role} model's output '{name}' holds NaN or Inf "
                f"on sample '{sample.source}'."
            )


def _check_shapes(name: str, ref: np.ndarray, cand: np.ndarray, sample: Sample) -> None:
    if np.shape(ref) != np.shape(cand):
        raise ModelMismatchError(
            f"Output '{name}' has shape {np.shape(ref)} in the reference and "
            f"{np.shape(cand)} in the candidate on sample '{sample.source}'."
        )


def _check_saved_sample(saved: SavedOutputs, index: int, sample: Sample) -> None:
    name = Path(sample.source).name
    if index >= len(saved.samples) or saved.samples[index] != name:
        raise CalibrationDataError(
            f"Saved outputs file '{saved.path}' was not made on this data: "
            f"sample {index} is '{name}' here"
            + (f" but '{saved.samples[index]}' there." if index < len(saved.samples) else ".")
        )


def _real_inputs(model: ir.Model) -> list[str]:
    return [value.name or "" for value in model.graph.inputs if not value.is_initializer()]


def _listing(names: Iterable[str]) -> str:
    return "(" + ", ".join(names) + ")"
