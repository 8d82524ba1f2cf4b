"""Static planning rules that keep layers float where int8 would not pay.

A thin Conv between float ops; a cheap first Conv on the model's input; float readers of
tensors that exist in float anyway; and the constant tables of float Adds, stored as int8
where their rounding stays small.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.graph_utils import constant_array
from qconvert.plan.decisions import (
    Role,
    TensorDecision,
)
from qconvert.plan.planner_state import PlannerState
from qconvert.plan.silu import silu_input
from qconvert.schemes import StaticScheme

MIN_TABLE_ELEMENTS = 256
"""A constant operand of a float Add with fewer elements is a few offsets: left float."""

TABLE_STEP_FRACTION = 8.0
"""A float Add's constant table is stored as int8 only where its rounding step stays under
this fraction of an int8 step of the sum."""

THIN_CONV_MAX_CHANNELS = 8
"""A Conv reading at most this many input channels per output (a depthwise Conv reads one,
an image's first Conv three) is thin: too little arithmetic per output for int8 to pay
for the QuantizeLinear, DequantizeLinear and layout changes of an int8 island (see
`_thin_conv_island`)."""

FLOAT_READERS_REASON = (
    "a node left float reads its output in float: onnxruntime fuses an integer kernel only "
    "where QuantizeLinear nodes alone read its output, so it would run in float anyway: "
    "computes in float"
)

EXCLUDED_CLAMP_READER_REASON = (
    "reads the output of an excluded {op} '{name}': a QuantizeLinear there would absorb "
    "the clamp (onnxruntime drops a Relu or Clip whose range the quantization saturates "
    "to), so this reads the float output: computes in float"
)

WIDENING_MAX_MACS = 64
"""A Conv doing at most this many multiply-accumulates per output value (input channels
per group x kernel area: a 1x1 Conv on up to 64 channels, a 5x5 depthwise Conv) is cheap
enough that where its int8 boundary sits decides its cost (see `_float_widening_conv`)."""

WIDENING_REASON = (
    "writes at least as many values as it reads, and only float ops read them: computed in "
    "float from its dequantized input, the int8 boundary moves to the narrower tensor (one "
    "DequantizeLinear there instead of QuantizeLinear, DequantizeLinear and layout changes "
    "on its output) and onnxruntime fuses the activation after it: computes in float"
)

STEM_MAX_MACS = 27
"""A Conv on a graph input doing at most this many multiply-accumulates per output value
(a 3x3 kernel on three colour channels, or on one grey channel) computes in float even
where quantized Convs read it (see `_float_stem_conv`)."""

STEM_MIN_VALUES = 4096
"""The stem rule applies where the Conv writes at least this many values a sample (or an
unknown number: a model whose image size is left open): below it (8x8 test images) either
kernel takes about a microsecond, and only the node count differs."""

STEM_REASON = (
    "first Conv on the model's float input, with few multiply-accumulates per output, "
    "and only Convs read its output (through its activation): onnxruntime's float kernel "
    "reads it straight from the input, while the integer kernel unfolds it into a short "
    "matrix product, so it computes in float and the int8 boundary moves to its output"
)

ISLAND_LAYER_REASON = (
    "onnxruntime has no integer {op} on CPU, and no integer kernel reads its output: "
    "computes in float on its input as written, with no QuantizeLinear and "
    "DequantizeLinear pair on its output"
)

THIN_ISLAND_REASON = (
    "thin Conv between float ops (few input channels per output): int8 would cost more in "
    "QuantizeLinear, DequantizeLinear and layout changes than it saves: computes in float"
)


class FloatIslandRules(PlannerState):
    """Decides which layers compute in float, and which float tensors are still stored int8."""

    def _read_in_float(self, value: ir.Value) -> bool:
        """Whether a reader of `value` (looking through Relu/Clip) reads it in float.

        Those are the nodes the user (--exclude, an override file), the recipe (a node it
        raises) or a mixed range leave float: they read the float tensor itself, not a
        dequantized copy (a float Conv or Gemm on a DequantizeLinear would be requantized
        by onnxruntime, `ops.REQUANTIZED_OPS`). Then the op writing `value` has a float
        reader beside its QuantizeLinear, and onnxruntime fuses a `DequantizeLinear -> op
        -> QuantizeLinear` group only where QuantizeLinear nodes alone read the op.
        """
        if value.is_graph_output():
            return False
        for reader in value.consumers():
            if reader.name in self.mixed:
                return True
            if self._skip_reason(reader) is not None and not self._reads_dequantized(reader):
                return True
            if (
                reader.op_type in ops.CLAMPS
                and len(reader.outputs) == 1
                and self._read_in_float(reader.outputs[0])
            ):
                return True
        return False

    def _held_clamps(self) -> frozenset[str]:
        """Excluded Relu and Clip nodes whose output an op that may run quantized reads.

        A QuantizeLinear of that output would make the clamp a no-op: onnxruntime drops a
        Relu before a QuantizeLinear whose zero point is the integer minimum, and a Clip
        whose bounds hold the quantized range, into the QuantizeLinear (or the integer
        kernel before it), and the excluded node runs on the integers after all. So the
        readers read the float output and compute in float (`_excluded_clamp_reader`):
        the exclusion holds. The clamp itself reads its input's DequantizeLinear
        (`_reads_dequantized`: nothing quantized reads it now), so the op before it keeps
        its integer kernel. On four 3x3 Convs of 32 channels (28x28, one thread, median
        of 300 runs) with the second Relu excluded: 0.53 ms at 32.5 dB, against 0.60 ms at
        33.6 dB with the Conv before the Relu float too, and 0.46 ms at 32.8 dB when the
        Relu was dropped into the QuantizeLinear (float: 0.58 ms).
        """
        return frozenset(
            node.name or ""
            for node in self._nodes()
            if node.op_type in ops.CLAMPS
            and len(node.outputs) == 1
            and self._skip_reason(node) is not None
            and self._feeds_quantized(node.outputs[0])
        )

    def _excluded_clamp_reader(self, node: ir.Node) -> str | None:
        """The reason `node` computes in float as a reader of an excluded clamp, if it is."""
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.name in self.held_clamps:
                return EXCLUDED_CLAMP_READER_REASON.format(
                    op=producer.op_type, name=producer.name
                )
        return None

    def _reads_dequantized(self, node: ir.Node) -> bool:
        """Whether `node`, left float, reads its quantized inputs through DequantizeLinear.

        onnxruntime requantizes a float Conv, ConvTranspose or Gemm that reads a
        DequantizeLinear (`ops.REQUANTIZED_OPS`), and fuses any other op into an integer
        kernel where a QuantizeLinear reads its output (an excluded Add would become a
        QLinearAdd). An op of neither kind whose output no quantized op reads (an excluded
        Add before a HardSwish, a LayerNormalization or a graph output) stays float on the
        dequantized values: reading them, it leaves the layers before it their integer
        kernels, which reading the float tensors would have planned float as well. On
        Conv -> Relu -> Conv, with the Add of both outputs excluded before a HardSwish
        (32 channels, 28x28, one thread, median of 300 runs): 0.49 ms at 32.7 dB, against
        0.66 ms at 35.4 dB with both Convs planned float (float: 0.60 ms).
        """
        return (
            node.op_type not in ops.REQUANTIZED_OPS
            and bool(node.outputs)
            and not any(self._feeds_quantized(output) for output in node.outputs)
        )

    def _float_readers_only(self, node: ir.Node, rule: ops.QuantizedOpRule) -> bool:
        """Whether `node`, a layer with constant weights, has a reader that reads in float.

        Quantized, it would run as a float kernel between DequantizeLinear and the next
        QuantizeLinear, with layout reorders around it (`_read_in_float`): an island the
        plan did not mean. It is planned float instead, from int8-stored weights
        (`_plan_float_layer`). On a chain of 32-channel 3x3 Convs (28x28) with the third
        left float, that ran the second Conv at the same output SQNR (34.4 dB) in 0.68 ms
        instead of 0.80 ms (one thread; float 0.63 ms).
        """
        if not rule.output or not node.outputs:
            return False
        if not any(
            constant_array(node.inputs[i]) is not None
            for i in rule.weights
            if i < len(node.inputs)
        ):
            return False
        return self._read_in_float(node.outputs[0])

    def _plan_float_layer(
        self,
        node: ir.Node,
        rule: ops.QuantizedOpRule,
        scheme: StaticScheme,
        reason: str = FLOAT_READERS_REASON,
    ) -> None:
        """Plans `node` float, from int8-stored weights, reading its input as written.

        An input written quantized is read through its DequantizeLinear: as a reader of
        the float tensor, `node` would leave the layer before it with only float readers
        in turn. onnxruntime fuses a float Conv on a DequantizeLinear into an integer
        kernel only when a QuantizeLinear reads its output, and here none does.
        """
        self._plan_stored_weights(node, rule, scheme, reason)
        source = node.inputs[0] if node.inputs else None
        if source is not None and self._written_quantized(source):
            self.float_readers.discard(node.name or "")
            self.reads_dequantized.add(node.name or "")

    def _thin_conv_island(self, node: ir.Node) -> bool:
        """Whether `node` is a thin Conv between float ops, which computes faster in float.

        Quantized there, it would run as an int8 island: a QuantizeLinear of its float
        input, onnxruntime's integer kernel (NHWC, so a Transpose on each side of it) and a
        DequantizeLinear for its float readers. A Conv reading few channels per output
        (THIN_CONV_MAX_CHANNELS: depthwise, or a first layer on three colour channels)
        does too little arithmetic to pay for that: measured one onnxruntime thread, such
        islands ran 1.9x (3x3 depthwise, 32 channels) to 2.9x (5x5 depthwise, 88 channels)
        and 2.2x (3x3 on 3 channels) slower than the float Conv, while islands of 32 input
        channels and more ran faster in int8. A small depthwise classifier whose 5x5
        depthwise Convs sit between HardSwish activations, runs in 0.65x of the time with
        them float. Inside an int8 chain the same Convs stay quantized: there the island
        costs are not paid.
        """
        if node.op_type != "Conv" or not node.inputs or not node.outputs:
            return False
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim < 3 or weight.shape[1] > THIN_CONV_MAX_CHANNELS:
            return False
        source, output = node.inputs[0], node.outputs[0]
        if (
            source is None
            or source.name in self.tensors
            or self._written_quantized(source)
            # An override file that names the node or its tensors decides for itself.
            or (node.name or "") in self.overrides.nodes
            or source.name in self.overrides.tensors
            or output.name in self.overrides.tensors
        ):
            return False
        readers = output.consumers()
        return (
            bool(readers)
            and not output.is_graph_output()
            and (
                not self._feeds_quantized(output)
                # A run of thin Convs ending at float ops and a gate (`plan.vectors`).
                or self._only_float_readers_behind(output)
            )
        )

    def _float_widening_conv(self, node: ir.Node) -> bool:
        """Whether `node` is a cheap widening Conv from the int8 chain into float ops.

        That is a Conv reading a tensor written quantized, doing at most WIDENING_MAX_MACS
        multiply-accumulates per output value, writing at least as many values as it reads (an
        expansion Conv, a depthwise Conv at stride 1), whose output no quantized op reads (a
        HardSwish, then a thin Conv left float, as in an inverted-residual block with
        HardSwish). Quantized, its output would be written as uint8 only to be dequantized at
        once, in the wider tensor, with a Transpose out of onnxruntime's NHWC integer layout,
        while the activation after it runs alone. In float, reading its input's
        DequantizeLinear, the conversions sit on the narrower input and onnxruntime fuses the
        Conv with the activation (NCHWc Conv + HardSwish). At these sizes the int8 kernel
        hardly beats the float one: on a small text-orientation classifier (1x1 Convs of 8 to
        32 input channels widening 3 to 6 times) the model ran 0.79x float instead of 0.85x
        (one thread, median of 400 interleaved runs), its nine HardSwish activations fused.
        """
        parts = _conv_parts(node)
        if parts is None:
            return False
        weight, source, output = parts
        if int(np.prod(weight.shape[1:])) > WIDENING_MAX_MACS:
            return False
        if not self._written_quantized(source) or output.is_graph_output():
            return False
        if (node.name or "") in self.overrides.nodes or output.name in self.overrides.tensors:
            return False  # an override file that names it decides for itself
        written, read = _written_and_read(node, weight)
        if written < read:
            return False
        return bool(output.consumers()) and not self._feeds_quantized(output)

    def _float_island_layer(self, node: ir.Node, rule: ops.QuantizedOpRule) -> bool:
        """Whether `node`, a layer without an integer kernel, has no integer reader either.

        onnxruntime runs a quantized ConvTranspose as DequantizeLinear -> float
        ConvTranspose -> QuantizeLinear (`ops.QDQ_FLOAT_ISLANDS`). The QuantizeLinear on
        its output pays only where an integer kernel reads it; where float ops, another
        such layer or a graph output read it, it is rounded and dequantized at once, on
        the widest tensor of a decoder head (a stride-2 ConvTranspose writes four times
        the values it reads). So the layer computes in float from int8-stored weights,
        reading its input's DequantizeLinear where its input is written quantized, and
        its output stays float. A text detector's segmentation head, two upsampling
        ConvTransposes before a Sigmoid output, is the case.
        """
        if node.op_type not in ops.QDQ_FLOAT_ISLANDS or not rule.weights or not node.outputs:
            return False
        if (node.name or "") in self.overrides.nodes or any(
            value is not None and value.name in self.overrides.tensors
            for value in (*node.inputs[:1], node.outputs[0])
        ):
            return False  # an override file that names it decides for itself
        return not self._feeds_quantized(node.outputs[0])

    def _float_stem_conv(self, node: ir.Node) -> bool:
        """Whether `node` is a model's first Conv on its image, faster in float.

        That is a Conv on a graph input (float at run time), with a spatial kernel doing
        at most STEM_MAX_MACS multiply-accumulates per output value (3x3 on three colour
        channels or one grey channel), writing more values than it reads (and at least
        STEM_MIN_VALUES a sample), whose output (through a Relu, Clip or SiLU) only Convs
        read.
        onnxruntime's float NCHWc kernel has a direct path for a Conv on a plain NCHW
        tensor of few channels; its integer kernel unfolds the input (im2col) into a
        matrix product whose inner dimension is 9 to 27, where int8 arithmetic saves
        nothing. So it computes in float, and the int8 boundary (QuantizeLinear,
        Transpose into NHWC) moves to its output. Measured one thread, median of
        interleaved runs: a 3x3 Conv from 1 channel to 32 (16x16) took 13 us in int8
        against 6 us in float; with the stem float an inverted-residual 224 CNN ran 0.46x
        float instead of 0.55x, a small depthwise-separable digit CNN 0.55x instead of
        0.60x, and a 50-layer depthwise-separable 224 CNN (stem behind a Pad) was
        unchanged (0.485x against 0.489x). A 7x7 Conv on 3 channels (147 per output, a
        residual 224 CNN's stem) runs faster in int8 (0.30x float, 0.46x with it float),
        hence the bound. Only Convs may read the output: a MaxPool there takes the
        QuantizeLinear before it and runs on uint8 NCHW values, slower than both (a small
        digit CNN went from 0.83x to 0.93x float).

        A SiLU there computes in float with the stem, fused by onnxruntime into one
        QuickGelu, and the QuantizeLinear moves after its Mul. On a 320x320 SiLU detector
        (3x3 stem, 3 -> 16 channels, at stride 2) the quantized stem and its SiLU took
        1.0 ms of a 10.5 ms kernel sum (the image's QuantizeLinear and Transpose, the
        integer Conv, QLinearSigmoid and QLinearMul), 1.4 ms with the next layer raised
        (two DequantizeLinear copies and an unfused Sigmoid and Mul instead), against
        0.5 ms in float; the model ran 0.94x onnxruntime's quantize_static output
        instead of 1.02x.
        """
        parts = _conv_parts(node)
        if parts is None:
            return False
        weight, source, output = parts
        if int(np.prod(weight.shape[1:])) > STEM_MAX_MACS or weight.shape[2:] == (1,) * (
            weight.ndim - 2
        ):
            return False
        if (
            not source.is_graph_input()
            or source.name in self.tensors
            or output.is_graph_output()
            # An override file that names the node or its tensors decides for itself.
            or (node.name or "") in self.overrides.nodes
            or source.name in self.overrides.tensors
            or output.name in self.overrides.tensors
        ):
            return False
        written, read = _written_and_read(node, weight)
        if written <= read or (_values(output) or STEM_MIN_VALUES) < STEM_MIN_VALUES:
            return False
        return _read_by_convs_only(output) and self._feeds_quantized(output)

    def _readers_of_float_values(self) -> set[str]:
        """Float nodes whose quantized inputs all exist in float anyway: they read those.

        A tensor written by a float op (LayerNormalization, say) or given as a graph input
        is float at run time; a float reader of its dequantized copy would only take on
        its rounding, and run one DequantizeLinear more. A residual Add reading the
        LayerNormalization output it skips over is the case that matters: the copy
        would put the int8 error of that output into the residual stream.
        """
        folded = {fold.output for fold in self.folds}
        readers = set()
        for node in self.graph:
            decision = self.nodes.get(node.name or "")
            if decision is None or decision.quantized:
                continue
            planned = [
                value
                for value in node.inputs
                if value is not None
                and value.name in self.tensors
                and self.tensors[value.name].role is Role.ACTIVATION
            ]
            if planned and all(
                value.name not in folded and not self._written_quantized(value)
                for value in planned
            ):
                readers.add(node.name or "")
        return readers

    def _plan_tables_of_float_adds(self) -> None:
        """Stores the constant tables that float Adds read as int8, one scale per row.

        A positional embedding added to the residual stream is the case: the Add stays
        float with the stream, yet the table is a weight like any other. It is stored as
        int8 (one scale per row, the axis before the last) and read through
        DequantizeLinear, where its rounding stays under 1/TABLE_STEP_FRACTION of an int8
        step of the sum: a table of grid offsets in pixels (a detector's anchors) would
        round by more and stays float.
        """
        for node in self.graph:
            decision = self.nodes.get(node.name or "")
            if node.op_type != "Add" or decision is None or decision.quantized:
                continue
            if self._skip_reason(node) is not None:
                continue  # the user left it float: its operands too
            seen = self.ranges.get(node.outputs[0].name)
            if seen is None:
                continue
            sum_step = (seen.max - seen.min) / 255.0
            for value in node.inputs:
                table = constant_array(value)
                if (
                    table is None
                    or table.dtype != np.float32
                    or table.ndim < 2
                    or table.size < MIN_TABLE_ELEMENTS
                    or value.name in self.tensors
                    or value.name not in self.graph.initializers
                    or self._overridden_float(value)
                    or any(reader.op_type != "Add" for reader in value.consumers())
                ):
                    continue
                params = qparams.weight_qparams(
                    table, self.scheme.weight_dtype, axis=table.ndim - 2, symmetric=True
                )
                if float(np.max(params.scale)) > sum_step / TABLE_STEP_FRACTION:
                    continue
                self.tensors[value.name] = TensorDecision(
                    value.name,
                    Role.WEIGHT,
                    params,
                    f"table read by {node.name}, which stays float: stored as int8 per row",
                )


def _read_by_convs_only(value: ir.Value) -> bool:
    """Whether only Convs read `value`, looking through a single Relu, Clip or SiLU.

    A SiLU (Sigmoid(x) and Mul(x, that Sigmoid)) then computes in float on the float
    Conv's output, where onnxruntime fuses the pair into one QuickGelu; the int8
    boundary moves to the Mul's output.
    """
    readers = value.consumers()
    if not readers:
        return False
    if silu_input(value):
        sigmoid = next(node for node in readers if node.op_type == "Sigmoid")
        mul = next(node for node in readers if node.op_type == "Mul")
        gate = sigmoid.outputs[0]
        if gate.is_graph_output() or len(gate.consumers()) != 1:
            return False
        value = mul.outputs[0]
        if value.is_graph_output() or not value.consumers():
            return False
        return all(reader.op_type == "Conv" for reader in value.consumers())
    for reader in readers:
        if reader.op_type in ops.CLAMPS and len(reader.outputs) == 1:
            clamped = reader.outputs[0]
            if clamped.is_graph_output() or not clamped.consumers():
                return False
            if any(after.op_type != "Conv" for after in clamped.consumers()):
                return False
        elif reader.op_type != "Conv":
            return False
    return True


def _group(node: ir.Node) -> int:
    return node.attributes.get_int("group", 1)


def _conv_parts(node: ir.Node) -> tuple[np.ndarray, ir.Value, ir.Value] | None:
    """(weight, input, output) of a Conv with a constant weight of rank 3 or more."""
    if node.op_type != "Conv" or len(node.inputs) < 2 or not node.outputs:
        return None
    weight = constant_array(node.inputs[1])
    source = node.inputs[0]
    if weight is None or weight.ndim < 3 or source is None:
        return None
    return weight, source, node.outputs[0]


def _written_and_read(node: ir.Node, weight: np.ndarray) -> tuple[int, int]:
    """The values a Conv writes and reads a sample; its channels when shapes are unknown."""
    written, read = _values(node.outputs[0]), _values(node.inputs[0])
    if written is None or read is None:
        return weight.shape[0], weight.shape[1] * _group(node)
    return written, read


def _values(value: ir.Value) -> int | None:
    """The number of values `value` holds per sample, or None where its shape is unknown."""
    shape = value.shape
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return int(np.prod([int(d) for d in shape[1:]]))
