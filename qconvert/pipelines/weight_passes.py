"""The weight-side passes `quantize` runs on request.

Cross-layer equalization, SmoothQuant, AdaRound and bias correction: each measures what it
needs on the calibration samples, changes the model or the plan, and adds a note for the
report.
"""

from __future__ import annotations

import dataclasses
import math

import onnx
import onnx_ir as ir

from qconvert import model as model_io
from qconvert.config import QuantizeConfig
from qconvert.dataset import (
    DirectorySource,
)
from qconvert.errors import (
    ConfigError,
)
from qconvert.layers import expose
from qconvert.passes import (
    prepare,
)
from qconvert.passes.adaround import adaround, adaround_nodes, gram_matrices
from qconvert.passes.bias_correct import (
    channel_means,
    correct_biases,
    correctable_nodes,
    input_axis,
)
from qconvert.passes.equalize import EqualizePass
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


def equalize_model(float_model: ir.Model) -> tuple[ir.Model, tuple[str, ...]]:
    """The model prepared at its own opset and cross-layer equalized, and a note."""
    prepared = prepare(float_model, min_opset=1)
    equalize = EqualizePass()
    equalize(prepared)
    pairs = ", ".join(f"{p.first}->{p.second}" for p in equalize.pairs) or "none found"
    note = (
        f"Cross-layer equalization: {len(equalize.pairs)} Conv pair(s) rescaled so each "
        f"channel's weight ranges match ({pairs}); pairs joined by a Clip (ReLU6) are not "
        "scale-equivariant and were left alone."
    )
    return prepared, (note,)


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


def _float_runs(prepared: ir.Model, names, source: DirectorySource):
    """The named tensors of the float `prepared` model, one dict per sample of `source`."""
    inputs = {value.name for value in prepared.graph.inputs}
    exposed = [name for name in names if name not in inputs]
    proto = onnx.load_model_from_string(model_io.to_bytes(prepared))
    session = make_session(expose(proto, exposed), quiet=True)
    for sample in source:
        # run(None) would return every output: ask only when there is a tensor to see
        outputs = session.run(exposed, sample.feeds) if exposed else []
        values = dict(zip(exposed, outputs, strict=True))
        values.update({n: a for n, a in sample.feeds.items() if n in names})
        yield values


def adaround_weights(
    prepared: ir.Model, plan: QuantPlan, source: DirectorySource, originals: dict
) -> QuantPlan:
    """Rounds the weights of `plan`'s MatMul/Gemm nodes in `prepared` (passes.adaround)."""
    nodes = adaround_nodes(prepared, plan)
    names = sorted({node.inputs[0].name for node in nodes})
    grams = gram_matrices(_float_runs(prepared, names, source), names) if names else {}
    rounded = adaround(plan, nodes, grams, originals)
    gains = [
        10 * math.log10(r.error_before / r.error_after)
        for r in rounded
        if r.error_after > 0 and r.error_before > 0
    ]
    note = (
        f"Adaptive rounding: {len(rounded)} MatMul/Gemm weight(s) rounded to minimise "
        f"their layer's output error on {len(source)} calibration samples (layer error "
        f"down {max(gains, default=0.0):.1f} dB at best, {min(gains, default=0.0):.1f} dB "
        "at least)."
    )
    return dataclasses.replace(plan, notes=(*plan.notes, note))


def correct_biases_of(
    prepared: ir.Model, plan: QuantPlan, source: DirectorySource, originals: dict
) -> QuantPlan:
    """Shifts the biases of `plan`'s Conv/Gemm nodes in `prepared` (bias_correct)."""
    nodes = correctable_nodes(prepared, plan)
    axes = {node.inputs[0].name: input_axis(node) for node in nodes}
    runs = _float_runs(prepared, list(axes), source)
    corrections = correct_biases(plan, nodes, channel_means(runs, axes), originals)
    largest = max((c.max_abs_shift for c in corrections), default=0.0)
    note = (
        f"Bias correction: {len(corrections)} Conv/Gemm bias(es) shifted by the mean error "
        f"their quantized weights make on {len(source)} calibration samples (largest "
        f"shift {largest:.3g})."
    )
    return dataclasses.replace(plan, notes=(*plan.notes, note))
