"""Static planning rules for activations and layer outputs.

An activation's parameters come from its calibrated range, widened to the bounds of the
op that writes it where calibration covered enough of them; a layer's output absorbs the
Relu/Clip chain after it where the quantization clamps exactly; a Mul by a positive
constant folds into the scale; an op without weights runs quantized only where a
quantized op reads its output (`_feeds_quantized`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.calibration import TensorRange
from qconvert.errors import CalibrationDataError
from qconvert.graph_utils import constant_array
from qconvert.plan.decisions import (
    ClampFold,
    Role,
    ScaleFold,
    TensorDecision,
)
from qconvert.plan.flat_ranges import cut_range, flat_bounds
from qconvert.plan.patterns import (
    clamp_chain,
    clamp_is_exact,
    combined_bounds,
)
from qconvert.plan.planner_state import PlannerState
from qconvert.plan.silu import silu_input, silu_input_range

BOUND_COVERAGE = 0.5
"""A tensor an op bounds (a Clip's output, a Sigmoid's) is quantized over the op's whole
output range when calibration already covered this share of it: at most one bit of
resolution is given up, and values the calibration set never reached (a gate that opens
fully on other data) are not clipped."""

_BOUNDED_OUTPUTS = {"Sigmoid": (0.0, 1.0)}
"""Quantized ops whose output lies in fixed bounds, whatever their input."""


class ActivationRules(PlannerState):
    """Plans activation tensors: inputs, outputs, clamp folds and scale folds."""

    def _plan_activation(self, value: ir.Value | None, reason: str) -> qparams.QParams | None:
        if value is None:
            return None
        if value.name in self.tensors:
            return self.tensors[value.name].qparams
        shared = self._shared_concat_params(value)
        if shared is not None:
            concat, params = shared
            reason = f"{reason}, shares the parameters of {concat}'s output"
        else:
            params = self._activation_params(value, value.name)
        self.tensors[value.name] = TensorDecision(value.name, Role.ACTIVATION, params, reason)
        return params

    def _activation_params(
        self,
        value: ir.Value,
        stats_name: str,
        *,
        bounds: tuple[float, float] | None = None,
    ) -> qparams.QParams:
        """Parameters from the calibrated range, widened to `bounds` where that fits.

        `bounds` is the fixed output range of the op that writes the tensor; the range is
        widened to it when calibration covered enough of it. What its readers cannot
        tell apart (below a HardSwish's -3, outside a Clip's bounds) is left off the grid
        (`plan.flat_ranges`), and a tensor only a SiLU reads may start above its
        calibrated minimum (`plan.silu`).
        """
        tensor_range = self.ranges.get(stats_name)
        if tensor_range is None:
            raise CalibrationDataError(
                f"The calibration has no range for tensor '{stats_name}'.",
                hint="calibrate again with this model.",
            )
        if bounds is not None:
            tensor_range = _widened_to_bounds(tensor_range, bounds)
        scheme = self._tensor_scheme(value)
        dtype = self.overrides.tensor_dtype(value.name or "") or scheme.activation_dtype
        # 16-bit activations are symmetric, as TensorFlow Lite's 16x8 defines them.
        symmetric = scheme.activation_symmetric or dtype.itemsize == 2
        levels = int(np.iinfo(dtype).max) - int(np.iinfo(dtype).min)
        flat = flat_bounds(value)
        if flat is not None:
            tensor_range = cut_range(tensor_range, flat, levels)
        histogram = self.histograms.get(stats_name)
        if histogram is not None and silu_input(value):
            tensor_range = silu_input_range(
                tensor_range, histogram, levels, symmetric=symmetric
            )
        return qparams.range_qparams(
            tensor_range.min, tensor_range.max, dtype, symmetric=symmetric
        )

    def _writes_float(
        self, node: ir.Node, weight_params: Mapping[int, qparams.QParams]
    ) -> bool:
        """Whether `node`'s integer kernel writes its output in float, unquantized.

        That is a Gemm or MatMul with constant weights (`ops.FLOAT_OUTPUT_KERNELS`) that
        no op running quantized reads: its readers (an Identity or Softmax before the
        graph output, a float op) dequantize it at once, so a QuantizeLinear there would
        only round and clip, and onnxruntime runs the layer as QGemm or
        MatMulIntegerToFloat all the same. The case is a classifier head too large to
        compute in float (`HEAD_FLOAT_MAX_WEIGHTS`): its logits grow with the model's
        confidence, past the range calibration saw. On a 224x224 depthwise CNN with a
        1000-class head (logits up to 8.9 on its calibration photos, 13.0 on its eval
        photos), the calibrated range clipped the top logit on 25 of 64 eval photos, all 7
        that changed their top-1 among them; the same model with float logits agreed on 62
        of 64 instead of 57.

        Readers that only move or select values (a Transpose, a Slice: `ops.PASS_THROUGH`)
        are looked through: an STFT computed as a MatMul over frames (`passes/frames.py`)
        is transposed and sliced into real and imaginary parts before float ops square
        them, and its spectrum is what loses most on one per-tensor grid.
        """
        output = node.outputs[0] if node.outputs else None
        return (
            bool(weight_params)
            and output is not None
            and node.op_type in ops.FLOAT_OUTPUT_KERNELS
            and self.overrides.tensor_dtype(output.name or "") is None
            and not self._moved_to_quantized(output)
        )

    def _moved_to_quantized(self, value: ir.Value) -> bool:
        """`_feeds_quantized`, looking through the pass-through ops that read `value`."""
        for node in value.consumers():
            if (
                node.op_type in ops.PASS_THROUGH
                and node.domain in ("", "ai.onnx")
                and len(node.outputs) == 1
                and not self._skip_reason(node)
            ):
                if self._moved_to_quantized(node.outputs[0]):
                    return True
            elif self._reads_quantized(node):
                return True
        return False

    def _plan_output(self, node: ir.Node) -> None:
        output = node.outputs[0]
        if (
            output.is_graph_output()
            or output.name in self.tensors
            or self._overridden_float(output)
            or self._feeds_mixed_concat(output)
            or self._model_answer(node)
        ):
            return
        # A tensor calibration never saw (a Conv output that preparation rescaled, as when
        # it folds a HardSigmoid) can still be quantized through the clamp after it, whose
        # output calibration did see; otherwise it is left float.
        chain = clamp_chain(output)
        # Only a tensor read by a Concat alone can share its parameters; one read by a
        # clamp alone is not looked up until the clamp cannot absorb it (`quantize --data`
        # calibrates it only then, `calibration.deferral`).
        shared = (
            self._shared_concat_params(output)
            if not chain and output.name in self.ranges
            else None
        )
        if shared is not None:
            concat, params = shared
            self.tensors[output.name] = TensorDecision(
                output.name,
                Role.ACTIVATION,
                params,
                f"output of {node.name}, shares the parameters of {concat}'s output",
            )
            return
        # The longest run of clamps that quantization can absorb wins: Relu then Clip(0, 6)
        # is quantized with the Clip's output range, not the Relu's wider one. An excluded
        # clamp stays a node of its own, so the run stops before it.
        for position, clamp in enumerate(chain):
            if self._skip_reason(clamp) is not None or self._overridden_float(
                clamp.outputs[0]
            ):
                chain = chain[:position]
                break
        for length in range(len(chain), 0, -1):
            clamps = chain[:length]
            clamped = clamps[-1].outputs[0]
            if clamped.name not in self.ranges:
                continue
            bounds = combined_bounds(clamps)
            params = self._activation_params(clamped, clamped.name, bounds=bounds)
            if not clamp_is_exact(params, bounds):
                continue
            names = tuple(clamp.name or "" for clamp in clamps)
            self.tensors[clamped.name] = TensorDecision(
                clamped.name,
                Role.ACTIVATION,
                params,
                f"output of {node.name}, absorbs {', '.join(names)}",
            )
            self.folds.append(ClampFold(names, output.name, clamped.name))
            for clamp in clamps:
                self._decide(clamp, True, f"folded into the quantization of {node.name}")
            return
        if output.name not in self.ranges:
            return
        bounds = _BOUNDED_OUTPUTS.get(node.op_type)
        params = self._activation_params(output, output.name, bounds=bounds)
        self.tensors[output.name] = TensorDecision(
            output.name, Role.ACTIVATION, params, f"output of {node.name}"
        )

    def _fold_scale(self, mul: ir.Node) -> bool:
        """Drops a Mul of a quantized tensor by a positive constant scalar into its scale.

        (x_q - z) * s * c is the product exactly, so the Mul needs neither a kernel nor a
        rounding: attention's scores / sqrt(d) are the case. Float readers read the same
        values as before (the Mul read the dequantized input), except a float Conv/Gemm,
        which is made to read the float tensor behind a DequantizeLinear: it keeps the Mul.
        """
        output = mul.outputs[0]
        if (
            mul.op_type != "Mul"
            or len(mul.inputs) != 2
            or output.is_graph_output()
            or output.name in self.tensors
            or self._overridden_float(output)
            or self.overrides.tensor_dtype(output.name or "") is not None
            or any(reader.op_type in ops.REQUANTIZED_OPS for reader in output.consumers())
        ):
            return False
        for source, constant in (mul.inputs, reversed(mul.inputs)):
            factor = constant_array(constant)
            decision = self.tensors.get(source.name) if source is not None else None
            if factor is None or factor.size != 1 or decision is None:
                continue
            value = float(factor.reshape(()))
            if decision.role is not Role.ACTIVATION or not 0.0 < value < float("inf"):
                continue
            scaled = (decision.qparams.scale * np.float32(value)).astype(np.float32)
            self.tensors[output.name] = TensorDecision(
                output.name,
                Role.ACTIVATION,
                replace(decision.qparams, scale=scaled),
                f"{source.name} x {value:g}, read at the scale of {source.name} x {value:g}",
            )
            self.scale_folds.append(ScaleFold(mul.name or "", source.name, output.name))
            self._decide(mul, True, f"folded into the scale of {source.name}")
            return True
        return False

    def _feeds_quantized(self, value: ir.Value) -> bool:
        """Whether an op that may run quantized reads `value` (looking through Relu/Clip).

        Ops left float (a GELU's, a mixed-range Add) do not count, and an Add or a Mul
        counts only when its result feeds such an op in turn, as it runs quantized only
        then. So the residual Adds of a transformer, whose sums reach only
        LayerNormalization, stay float, and so does the branch output they add: the
        residual stream keeps full precision, the int8 error of each block is not carried
        into every later one, and onnxruntime fuses bias, residual Add and
        LayerNormalization into one SkipLayerNormalization.

        A Mul by a constant folded into a scale (`_fold_scale`) is no exception: its output
        is dequantized for its float readers, so the op before it would write int8 only to
        be read back in float. The blocks of a 320x320 text detector's lightweight CNN
        backbone are the case: each Conv is followed by a learnable a * x + b around a float
        HardSwish. Seen through the Mul as feeding a quantized op, their depthwise Convs ran
        as int8 islands rather than thin float Convs, and the detector ran 0.67x float
        instead of 0.62x (one thread, median of 200 interleaved runs).
        """
        if value.name in self.feeds_quantized:
            return self.feeds_quantized[value.name]
        answer = any(self._reads_quantized(node) for node in value.consumers())
        self.feeds_quantized[value.name] = answer
        return answer

    def _reads_quantized(self, node: ir.Node) -> bool:
        """Whether `node` may run quantized on the value it reads (`_feeds_quantized`)."""
        rule = ops.quantized_rule(node)
        if self._excluded_clamp_reader(node) is not None:
            return False  # reads an excluded clamp's float output
        if node.op_type in ops.CLAMPS:
            return self._feeds_quantized(node.outputs[0])
        if self._skip_reason(node):
            return False  # left float by the user or the recipe, whatever its type
        if rule is not None and node.op_type in ops.QDQ_FLOAT_ISLANDS:
            # No integer kernel (ConvTranspose on CPU): it reads a quantized input only
            # where its own output feeds one (`_float_island_layer`).
            return bool(node.outputs) and self._feeds_quantized(node.outputs[0])
        if (
            rule is not None
            and rule.output
            and not rule.weights
            and node.outputs[0].is_graph_output()
        ):
            return False  # refused: no integer kernel without a quantized output
        if node.op_type in ops.PASS_THROUGH or (rule is not None and rule.weights):
            return True
        if rule is None or node.name in self.gelu:
            return False
        if node.op_type in _ONLY_IN_A_CHAIN:
            return self._feeds_quantized(node.outputs[0])
        return True


_ONLY_IN_A_CHAIN = frozenset({"Add", "Mul"})
"""Ops without weights that `_feeds_quantized` looks through: quantized, they run on the
integers only where their result feeds an op that may run quantized."""


def _widened_to_bounds(seen: TensorRange, bounds: tuple[float, float]) -> TensorRange:
    """`seen`, or the op's output `bounds` when it covers BOUND_COVERAGE of them."""
    low, high = bounds
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return seen
    # The integer grid always holds zero, so what widening costs is the ratio of the grids.
    covered = min(max(seen.max, 0.0), high) - max(min(seen.min, 0.0), low)
    if covered < BOUND_COVERAGE * (high - low):
        return seen
    return TensorRange(min=low, max=high)
