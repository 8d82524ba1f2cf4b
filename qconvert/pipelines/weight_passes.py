"""The weight-side passes `quantize` runs on request.

Cross-layer equalization, SmoothQuant, AdaRound and bias correction: each measures what it
needs on the calibration samples, changes the model or the plan, and adds a note for the
report.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from qconvert import handed_weights
from qconvert import model as model_io
from qconvert.config import QuantizeConfig
from qconvert.dataset import (
    DirectorySource,
)
from qconvert.errors import (
    ConfigError,
)
from qconvert.layers import expose
from qconvert.memory import release_dropped
from qconvert.passes import equalize as pair_equalization
from qconvert.passes import equalize_activations as activation_equalization
from qconvert.passes import (
    prepare,
)
from qconvert.passes.adaround import (
    GramAccumulator,
    adaround,
    adaround_nodes,
    gram_groups,
    layer_grams,
    rounding_key,
)
from qconvert.passes.bias_correct import (
    channel_means,
    correct_biases,
    correctable_nodes,
    input_axis,
)
from qconvert.passes.equalize import EqualizePass
from qconvert.passes.equalize_activations import (
    EqualizeActivationsPass,
    activation_sites,
)
from qconvert.passes.equalize_activations import (
    channel_absmax as activation_channel_absmax,
)
from qconvert.passes.smooth import channel_absmax, smooth, smooth_sites
from qconvert.plan import QuantPlan
from qconvert.runtime import make_session


def check_weight_passes(config: QuantizeConfig, data, calib) -> None:
    """Refuses weight passes without the samples they measure on."""
    for flag, wanted in (
        ("--equalize", config.equalize),
        ("--bias-correction", config.bias_correction),
        ("--adaround", config.adaround),
        ("--smooth-quant", config.smooth_quant is not None),
    ):
        if wanted and calib is not None:
            raise ConfigError(
                f"{flag} does not go with --calib: the file holds statistics of the model "
                "as it was, not as the pass changes it.",
                hint="pass --data DIR to calibrate the changed model now.",
            )
    needs_data = {
        "--bias-correction": config.bias_correction,
        "--adaround": config.adaround,
        "--smooth-quant": config.smooth_quant is not None,
    }
    if any(needs_data.values()) and data is None:
        flag = next(name for name, wanted in needs_data.items() if wanted)
        raise ConfigError(
            f"{flag} needs --data DIR: it measures the activations on samples.",
        )


ACTIVATION_SAMPLES = 16
"""Calibration samples activation equalization measures channel ranges on: one float pass
over a quarter of the bench's 64, enough to tell a 10x-narrow channel from a wide one."""


def equalize_model(
    float_model: ir.Model,
    source: DirectorySource | None = None,
    *,
    per_channel: bool = True,
) -> tuple[ir.Model, tuple[str, ...]]:
    """The model prepared at its own opset and cross-layer equalized, and notes.

    With samples (`source`) and per-channel weights, the tensors between float islands are
    equalized too (`passes.equalize_activations`), on their channel ranges over the first
    `ACTIVATION_SAMPLES` samples.
    """
    prepared = prepare(float_model, min_opset=1)
    equalize = EqualizePass()
    equalize(prepared)
    pairs = ", ".join(f"{p.first}->{p.second}" for p in equalize.pairs) or "none found"
    notes = [
        f"Cross-layer equalization: {len(equalize.pairs)} Conv pair(s) rescaled so each "
        f"channel's weight ranges match ({pairs}); pairs joined by a Clip (ReLU6) are not "
        "scale-equivariant and were left alone."
    ]
    if source is not None and per_channel:
        tensors = equalize_activations(prepared, source)
        if tensors:
            notes.append(
                f"Activation equalization: {len(tensors)} tensor(s) had their narrow "
                "channels scaled up to the widest, undone by the depthwise Conv or Mul "
                f"that reads them ({', '.join(tensors)})."
            )
    return prepared, tuple(notes)


def rescaled_by_equalization(
    prepared: ir.Model, *, per_channel: bool = True
) -> frozenset[str]:
    """The tensors of an `equalize_model` result whose values equalization rescaled.

    Equalization changes weights so that only the tensors between the two sides of a
    pair or site carry rescaled channels; every other tensor is the float function it
    was (up to float rounding). The pairs and sites are found on the graph, which the
    passes leave as it was, so the equalized model tells them as well as the original.
    """
    rescaled = pair_equalization.rescaled_values(prepared)
    if per_channel:
        rescaled |= activation_equalization.rescaled_values(prepared)
    return rescaled


def equalize_activations(prepared: ir.Model, source: DirectorySource) -> list[str]:
    """Equalizes `prepared`'s activation sites in place; returns the tensors changed."""
    names = [site.name for site in activation_sites(prepared)]
    if not names:
        return []
    proto = onnx.load_model_from_string(model_io.to_bytes(prepared))
    session = make_session(expose(proto, names), quiet=True)
    samples = itertools.islice(source, ACTIVATION_SAMPLES)
    runs = (
        dict(zip(names, session.run(names, sample.feeds), strict=True)) for sample in samples
    )
    equalize = EqualizeActivationsPass(absmax=activation_channel_absmax(runs, names))
    equalize(prepared)
    return equalize.tensors


def smooth_model(
    float_model: ir.Model, source: DirectorySource, alpha: float
) -> tuple[ir.Model, tuple[str, ...]]:
    """The model prepared at its own opset with SmoothQuant applied, and a note."""
    prepared = prepare(float_model, min_opset=1)
    sites = smooth_sites(prepared)
    names = [site.tensor for site in sites]
    changed = 0
    if names:
        proto = onnx.load_model_from_string(model_io.to_bytes(prepared))
        session = make_session(expose(proto, names), quiet=True)
        runs = (
            dict(zip(names, session.run(names, sample.feeds), strict=True))
            for sample in source
        )
        changed = smooth(sites, channel_absmax(runs, names), alpha)
    note = (
        f"SmoothQuant (alpha {alpha:g}): {changed} LayerNormalization output(s) had their "
        "per-channel outliers moved into the MatMul weights that read them."
    )
    return prepared, (note,)


@dataclasses.dataclass(frozen=True, slots=True)
class _Detached:
    """A float model as a protobuf without its large weights, and those weights.

    A session of it is made from the graph's bytes with the weights handed over as arrays
    (`handed_weights`): the model is never serialized whole. On an 18-layer 224 residual CNN
    (46 MB of weights), AdaRound held a protobuf of the whole model through its float
    passes and each session build added a copy of it and its bytes.

    The arrays are the model's own (`handed_weights.serialize_detached`), not copies: the
    weight passes replace a tensor, never write into one, so they stay the float weights
    the session needs. Serializing whole and then detaching held two copies of the
    weights more while the session was built, the peak of the default recipe on that CNN
    (549 MB).
    """

    proto: onnx.ModelProto
    weights: dict[str, np.ndarray]


def _detached(prepared: ir.Model) -> _Detached:
    proto, weights = handed_weights.serialize_detached(prepared)
    return _Detached(proto=proto, weights=weights)


def _float_runs(prepared: ir.Model | _Detached, names, source: DirectorySource):
    """The named tensors of the float `prepared` model, one dict per sample of `source`."""
    model = prepared if isinstance(prepared, _Detached) else _detached(prepared)
    del prepared
    inputs = {value.name for value in model.proto.graph.input}
    exposed = [name for name in names if name not in inputs]
    # No spinning: between runs the cores go to the numpy work on the outputs. No arena:
    # it would hold every exposed tensor in chunks grown by doubling.
    session = make_session(
        expose(model.proto, exposed),
        quiet=True,
        spin=False,
        arena=False,
        weights=model.weights,
    )
    del model  # onnxruntime copied the weights it was handed (or they are the model's)
    for sample in source:
        # run(None) would return every output: ask only when there is a tensor to see
        outputs = session.run(exposed, sample.feeds) if exposed else []
        values = dict(zip(exposed, outputs, strict=True))
        values.update({n: a for n, a in sample.feeds.items() if n in names})
        yield values


PARTS_BYTES = 16 << 20
"""The most bytes of per-sample sums `FloatInputs` keeps (a 50-layer depthwise-separable 224
CNN's 48 calibration samples take about 6 MB). Past it, the means are kept by the samples they
cover, as one sum each, and the recipe's refit measures every sample again: at 1,024 samples a
wide model's parts would take hundreds of MB."""


class FloatInputs:
    """What the weight passes measured on the float inputs of a prepared model's layers.

    The default recipe tries the weight passes many times on one float model (alone,
    together, with nodes kept float), and then once more on every sample (its refit):
    what they measure and choose is kept here and shared. One `FloatInputs` serves one
    prepared model only.
    """

    def __init__(self, *, rounding_follows: bool = True) -> None:
        """Nothing measured yet.

        `rounding_follows`: False where weight rounding will not run on this model, so
        bias correction's float pass has no H to measure for it (`grams`).
        """
        self.rounding_follows = rounding_follows
        self.parts: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
        """Per bias-corrected input tensor, per sample (its source): the sum of the
        tensor's values per channel, and how many values each channel summed. Kept per
        sample, so the refit on every sample measures only the held-out ones, and adds
        the parts up in the order one pass over all samples does (the same bits)."""
        self.means_by_samples: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        """The means, by the samples they cover, once the parts outgrew `PARTS_BYTES`."""
        self.rounded: dict = {}
        """Each layer's rounding by `rounding_key` (`adaround`'s `chosen_before`): H is
        needed once per layer and grid, and is not kept (tens of MB a model)."""
        self.grams: dict[tuple[str, str], np.ndarray] = {}
        """H of layers measured in bias correction's float pass, by (node, input) name,
        until weight rounding takes them (`take_grams`): the recipe tries bias correction
        first, on the very samples and float model rounding measures H on next, so its
        pass measures rounding's first `GRAM_BYTES` of H too, one float pass fewer."""
        self.shifts: dict = {}
        """Each bias-corrected node's output shift (`bias_correct.correct_biases`'
        `known`): the raise phase corrects every bias again for each node it scores
        raised, and a raise leaves the other nodes' weights and quantization as they
        were."""

    def for_samples(self) -> FloatInputs:
        """A `FloatInputs` that shares the per-sample parts, not the roundings.

        A rounding is chosen from all the samples a layer saw; a new set of samples
        must choose its own.
        """
        shared = FloatInputs()
        shared.parts = self.parts
        return shared

    def unchanged_on(
        self, prepared: ir.Model, rescaled: frozenset[str], *, rounding_follows: bool = True
    ) -> FloatInputs:
        """What this one measured, for `prepared`: its model with `rescaled` tensors changed.

        `rescaled` is what `rescaled_by_equalization` finds; `rounding_follows` is as
        for `FloatInputs`. The input means of every other tensor, and the rounding of
        every layer that reads none of them, are those of the same float function; a
        layer whose weights changed has another `rounding_key` and is rounded again.
        """
        readers = {
            node.name or ""
            for node in prepared.graph
            if any(value is not None and value.name in rescaled for value in node.inputs)
        }
        shared = FloatInputs(rounding_follows=rounding_follows)
        shared.parts = {n: dict(p) for n, p in self.parts.items() if n not in rescaled}
        shared.means_by_samples = {
            sources: {n: m for n, m in means.items() if n not in rescaled}
            for sources, means in self.means_by_samples.items()
        }
        shared.rounded = {k: v for k, v in self.rounded.items() if k[0] not in readers}
        return shared

    def means(
        self,
        prepared: ir.Model,
        plan: QuantPlan,
        source: DirectorySource,
        grams_of: Callable[[], list[ir.Node]] | None = None,
    ) -> dict[str, np.ndarray]:
        """The per-channel mean of each correctable node's float input over `source`.

        Keyed by the input's name; what was not measured before is run now. When that
        run covers every sample of `source`, it also measures H of the nodes `grams_of`
        names, whose input it exposes anyway (`grams`): the same session, so the same
        values, summed per layer in the same order as rounding's own pass would. It is
        asked only then: finding those nodes hashes every weight (`rounding_key`), and the
        recipe corrects biases again for every raise it scores.
        """
        axes = {
            node.inputs[0].name: input_axis(node) for node in correctable_nodes(prepared, plan)
        }
        sources = source.sources()
        known = self.means_by_samples.get(sources, {})
        means = {name: known[name] for name in axes if name in known}
        wanted = [name for name in axes if name not in known]
        unseen = [
            index
            for index, sample in enumerate(sources)
            if any(sample not in self.parts.get(name, {}) for name in wanted)
        ]
        if unseen:
            names = sorted(
                name
                for name in wanted
                if any(sources[i] not in self.parts.get(name, {}) for i in unseen)
            )
            runs = _float_runs(prepared, names, source.select(unseen))
            exposed = set(names)
            every = (
                grams_of is not None and self.rounding_follows and len(unseen) == len(sources)
            )
            measured = [
                node
                for node in (grams_of() if every else [])
                if node.inputs[0].name in exposed
            ]
            grams = GramAccumulator(measured, len(unseen)) if measured else None
            with one_blas_thread():
                for index, run in zip(unseen, runs, strict=True):
                    for name, mean in channel_means(
                        [run], {n: axes[n] for n in names}
                    ).items():
                        count = _count(run[name], axes[name])
                        self.parts.setdefault(name, {})[sources[index]] = (
                            mean * count,
                            count,
                        )
                    if grams is not None:
                        grams.update(run)
            if grams is not None:
                found = grams.result()
                for node in measured:
                    if (node.name or "") in found:
                        self.grams[(node.name or "", node.inputs[0].name)] = found[
                            node.name or ""
                        ]
        for name in wanted:
            total, count = 0.0, 0
            for sample in sources:
                part, values = self.parts[name][sample]
                total, count = total + part, count + values
            means[name] = total / count
        kept = sum(part.nbytes for parts in self.parts.values() for part, _ in parts.values())
        if kept > PARTS_BYTES:
            self.means_by_samples.setdefault(sources, {}).update(means)
            self.parts.clear()
        return means

    def take_grams(self, nodes: list[ir.Node]) -> dict[str, np.ndarray]:
        """H measured before for these nodes, by node name; each is handed over once."""
        keys = [(node.name or "", node.inputs[0].name) for node in nodes]
        return {key[0]: self.grams.pop(key) for key in keys if key in self.grams}

    def first_grams_wanted(self, prepared: ir.Model, plan: QuantPlan) -> list[ir.Node]:
        """The layers weight rounding would measure in its first float pass on `plan`."""
        nodes = adaround_nodes(prepared, plan)
        missing = [node for node in nodes if rounding_key(node, plan) not in self.rounded]
        groups = gram_groups(missing)
        return groups[0] if groups else []


def round_weights(
    prepared: ir.Model,
    plan: QuantPlan,
    source: DirectorySource,
    originals: dict,
    rounded: dict,
    inputs: FloatInputs | None = None,
) -> list:
    """`adaround` on the plan's layers, measuring H only for layers not in `rounded`.

    The layers to measure go in runs whose H fit `adaround.GRAM_BYTES`: one float pass
    each, on the float model as it was before any of them was rounded; each run's H is
    dropped once its layers are rounded. H that bias correction's pass measured on the
    same samples (`inputs.grams`) is taken instead of measured again.
    """
    nodes = adaround_nodes(prepared, plan)
    missing = [node for node in nodes if rounding_key(node, plan) not in rounded]
    results = []
    early = inputs.take_grams(missing) if inputs is not None else {}
    measuring = [node for node in missing if (node.name or "") not in early]
    detached = _detached(prepared) if measuring else None
    with one_blas_thread():
        if early:
            taken = [node for node in missing if (node.name or "") in early]
            results += adaround(plan, taken, early, originals, rounded)
        for group in gram_groups(measuring):
            names = sorted({node.inputs[0].name for node in group})
            grams = layer_grams(_float_runs(detached, names, source), group, len(source))
            results += adaround(plan, group, grams, originals, rounded)
            del grams
            # The run's session and H are dropped: freed before the next run's are built
            # on top (a 6-layer sentence encoder grew 70 MB a run without it).
            release_dropped()
        done = {id(node) for node in missing}
        results += adaround(
            plan, [n for n in nodes if id(n) not in done], {}, originals, rounded
        )
    return results


def one_blas_thread():
    """Runs the numpy products inside on one BLAS thread.

    BLAS's threads and onnxruntime's fight for the cores: on 2 busy cores the
    [960 x 32] x [32 x 320] products of `adaround._descend` took 10x longer on two BLAS
    threads than on one, and a 960 x 960 x 320 product is barely faster on two when idle.
    """
    return threadpool_limits(limits=1, user_api="blas")


def _count(values: np.ndarray, axis: int) -> int:
    """Values per channel of one run (what `channel_means` averages over)."""
    return int(np.asarray(values).size // np.asarray(values).shape[axis])


def adaround_weights(
    prepared: ir.Model,
    plan: QuantPlan,
    source: DirectorySource,
    originals: dict,
    inputs: FloatInputs | None = None,
) -> QuantPlan:
    """Rounds the weights of `plan`'s Conv/ConvTranspose/MatMul/Gemm nodes (adaround).

    `inputs` holds (and gets) the roundings earlier tries chose on the same float model.
    """
    nodes = adaround_nodes(prepared, plan)
    rounded = round_weights(
        prepared,
        plan,
        source,
        originals,
        inputs.rounded if inputs is not None else {},
        inputs,
    )
    gains = [
        10 * math.log10(r.error_before / r.error_after)
        for r in rounded
        if r.error_after > 0 and r.error_before > 0
    ]
    kinds = "/".join(sorted({node.op_type for node in nodes})) or "layer"
    note = (
        f"Adaptive rounding: {len(rounded)} {kinds} weight(s) rounded to minimise "
        f"their layer's output error on {len(source)} calibration samples (layer error "
        f"down {max(gains, default=0.0):.1f} dB at best, {min(gains, default=0.0):.1f} dB "
        "at least)."
    )
    return dataclasses.replace(plan, notes=(*plan.notes, note))


def correct_biases_of(
    prepared: ir.Model,
    plan: QuantPlan,
    source: DirectorySource,
    originals: dict,
    inputs: FloatInputs | None = None,
) -> QuantPlan:
    """Shifts the biases of `plan`'s Conv/Gemm nodes in `prepared` (bias_correct).

    `inputs` holds (and gets) what earlier tries measured on the same float model: then
    the means are those of the float model's inputs, before any weight was rounded.
    """
    nodes = correctable_nodes(prepared, plan)
    if inputs is not None:
        means = inputs.means(
            prepared, plan, source, grams_of=lambda: inputs.first_grams_wanted(prepared, plan)
        )
    else:
        axes = {node.inputs[0].name: input_axis(node) for node in nodes}
        means = channel_means(_float_runs(prepared, list(axes), source), axes)
    # The float pass's session is dropped: freed before the corrections' float64 copies
    # of each weight come on top (the default recipe's peak on a 224 residual CNN).
    release_dropped()
    known = inputs.shifts if inputs is not None else None
    corrections = correct_biases(plan, nodes, means, originals, known)
    largest = max((c.max_abs_shift for c in corrections), default=0.0)
    note = (
        f"Bias correction: {len(corrections)} Conv/Gemm bias(es) shifted by the mean error "
        f"their quantized weights make on {len(source)} calibration samples (largest "
        f"shift {largest:.3g})."
    )
    return dataclasses.replace(plan, notes=(*plan.notes, note))
