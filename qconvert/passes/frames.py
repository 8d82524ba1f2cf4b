"""A one-channel strided Conv1d becomes a MatMul over frames (an STFT front end).

Audio models often start with a Conv over the raw signal: one input channel, a kernel of m
hops, a stride of one hop (an STFT's basis, a learned filterbank). Run quantized, a Conv
must write uint8 (QLinearConv has no float output), and a spectrum has one range per
frequency: one per-tensor grid over all of them is what costs a voice-activity detector
most. Its STFT Conv's output alone on that grid cost its output 14.7 dB; written in float
it takes the model from 13.8 to 18.1 dB.

With F output frames, stride S and kernel K = m * S, the rewrite (same numbers up to the
order of a float sum):

    blocks = Reshape(x[:, :, :(F + m - 1) * S], (-1, F + m - 1, S))
    frames = Concat(blocks[:, 0:F], ..., blocks[:, m-1:m-1+F], axis=2)     (N, F, K)
    y      = Transpose(MatMul(frames, W^T) [+ b], (0, 2, 1))                (N, C, F)

A MatMul no quantized op reads writes float (`ActivationRules._writes_float`):
onnxruntime runs it as MatMulIntegerToFloat, each output channel on its own weight scale
and no output grid, and the frames move as uint8 (Slice, Reshape, Concat). Measured on
that detector's STFT shape (64 x 704 samples, 258 channels, K 256, S 128; one thread):
QLinearConv 168 us, frames + MatMulIntegerToFloat 142 us; in float, Conv 1,523 us and
MatMul 370 us, so the float model gains too. ConvInteger (int32 output) took 1,632 us.

Only where the frames are plain slices: 1-D, one input channel, one group, no dilation, no
padding (a Pad before it stays: reflect padding is not a Conv's), K a multiple of S. A
symbolic length is evaluated where constants decide it (`constant_lengths`); otherwise the
frames are cut at run time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from qconvert.graph_utils import add_initializer, constant_array, replace_keeping_name
from qconvert.names import NameAllocator


class ConvAsFramesPass(ir.passes.InPlacePass):
    """Rewrites every qualifying Conv of the main graph (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        lengths: dict[str, int] | None = None
        for node in list(graph):
            shape = frame_shape(node)
            if shape is None:
                continue
            frames, stride, hops = shape
            if frames is None:
                if lengths is None:
                    lengths = constant_lengths(model)
                length = lengths.get(node.inputs[0].name or "")
                if length is not None and length >= stride * hops:
                    frames = (length - stride * hops) // stride + 1
            _rewrite(graph, names, node, frames, stride, hops)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def constant_lengths(model: ir.Model) -> dict[str, int]:
    """The last dimension of every value whose shape constants alone decide.

    Exporters compute a reflect Pad's amounts from ConstantOfShape, Concat and Slice ops on
    constants, which shape inference does not evaluate: the padded length stays symbolic,
    and the frames would need Shape -> Gather -> Div -> Mul -> Slice when the model runs
    (11 us of one thread on a voice-activity detector). Here the shape ops on constants
    are evaluated (`_fold`, numpy; onnx's reference evaluator costs 12 MB to import) into
    initializers of a copy, and its shapes inferred again. Empty where anything fails: the
    frames are then cut at run time.
    """
    try:
        proto = ir.to_proto(model)
        arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        rest = []
        for node in proto.graph.node:
            inputs = [arrays.get(name) if name else None for name in node.input]
            known = all(
                a is not None for a, name in zip(inputs, node.input, strict=True) if name
            )
            outputs = _fold(node, inputs) if known else None
            if outputs is None:
                rest.append(node)
                continue
            arrays.update(zip(node.output, outputs, strict=True))
        wanted = {name for node in rest for name in node.input}
        wanted.update(output.name for output in proto.graph.output)
        have = {t.name for t in proto.graph.initializer}
        del proto.graph.node[:]
        proto.graph.node.extend(rest)
        proto.graph.initializer.extend(
            onnx.numpy_helper.from_array(np.asarray(array), name)
            for name, array in arrays.items()
            if name in wanted and name not in have
        )
        del proto.graph.value_info[:]
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - any failure only means the length stays unknown
        return {}
    lengths = {}
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            lengths[info.name] = dims[-1].dim_value
    return lengths


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """What a shape op on constants computes, or None for any other op."""
    if node.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op, data = node.op_type, inputs[0] if inputs else None
    if op == "ConstantOfShape":
        fill = attrs.get("value")
        value = (
            onnx.numpy_helper.to_array(fill) if fill is not None else np.zeros(1, np.float32)
        )
        return [np.full(tuple(int(d) for d in data), value.reshape(-1)[0], value.dtype)]
    if op == "Concat":
        return [np.concatenate(inputs, axis=attrs["axis"])]
    if op == "Cast":
        return [data.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))]
    if op == "Reshape" and not attrs.get("allowzero", 0):
        shape = [data.shape[i] if d == 0 else int(d) for i, d in enumerate(inputs[1])]
        return [data.reshape(shape)]
    if op == "Transpose":
        return [np.transpose(data, attrs.get("perm"))]
    if op == "Slice":
        axes = (
            inputs[3] if len(inputs) > 3 and inputs[3] is not None else range(len(inputs[1]))
        )
        steps = (
            inputs[4] if len(inputs) > 4 and inputs[4] is not None else [1] * len(inputs[1])
        )
        index = [slice(None)] * data.ndim
        for start, end, axis, step in zip(inputs[1], inputs[2], axes, steps, strict=True):
            index[int(axis)] = slice(int(start), int(end), int(step))
        return [data[tuple(index)]]
    if op in ("Unsqueeze", "Squeeze") and len(inputs) > 1:
        axes = tuple(int(a) for a in inputs[1])
        if op == "Squeeze":
            return [np.squeeze(data, axis=axes)]
        return [np.expand_dims(data, tuple(sorted(a % (data.ndim + len(axes)) for a in axes)))]
    return None


def frame_shape(node: ir.Node) -> tuple[int | None, int, int] | None:
    """(frames F, stride S, hops per kernel m) when `node` qualifies, else None.

    F is None where the signal's length is known only when the model runs.
    """
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = constant_array(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if weight is None or weight.ndim != 3 or weight.shape[1] != 1:
        return None
    if bias is not None and constant_array(bias) is None:
        return None
    attrs = node.attributes
    kernel = weight.shape[2]
    strides = attrs.get_ints("strides", [1])
    if (
        attrs.get_int("group", 1) != 1
        or attrs.get_string("auto_pad", "NOTSET") != "NOTSET"
        or any(d != 1 for d in attrs.get_ints("dilations", [1]))
        or any(p != 0 for p in attrs.get_ints("pads", [0, 0]))
        or len(strides) != 1
        or kernel % strides[0] != 0
    ):
        return None
    x = node.inputs[0]
    dims = x.shape if x is not None else None
    if dims is None or len(dims) != 3 or dims[1] != 1:
        return None
    stride = strides[0]
    length = dims[2] if isinstance(dims[2], int) else None
    if length is not None and length < kernel:
        return None
    frames = None if length is None else (length - kernel) // stride + 1
    return frames, stride, kernel // stride


def _rewrite(
    graph: ir.Graph,
    names: NameAllocator,
    conv: ir.Node,
    frames: int | None,
    stride: int,
    hops: int,
) -> None:
    x = conv.inputs[0]
    weight = constant_array(conv.inputs[1])
    channels = weight.shape[0]
    base = conv.name or "conv"
    batch = x.shape[0]

    # The file is the product: the index constants are shared by value, and each value
    # takes its node's name (the QuantizeLinear pairs the plan puts around the moves
    # repeat it six times). On a voice-activity detector that is 0.04% of its float size,
    # across the 27% line.
    shared: dict[bytes, ir.Value] = {}

    def const(label: str, array: np.ndarray) -> ir.Value:
        key = array.dtype.str.encode() + repr(array.shape).encode() + array.tobytes()
        if key not in shared:
            shared[key] = add_initializer(graph, names.fresh(f"{base}_{label}"), array)
        return shared[key]

    def add(
        op: str,
        inputs: list[ir.Value],
        shape: list,
        attributes: dict | None = None,
        dtype: ir.DataType | None = None,
    ) -> ir.Value:
        name = names.fresh(f"{base}_{op.lower()}")
        node = ir.node(op, inputs, attributes or {}, name=name)
        out = node.outputs[0]
        out.name = name
        out.shape = ir.Shape(shape)
        out.type = x.type if dtype is None else ir.TensorType(dtype)
        graph.insert_before(conv, node)
        return out

    # With L samples the frames span L // S whole hops (F + m - 1 = (L - K) // S + m);
    # the samples past the last whole hop no frame reads.
    blocks = None if frames is None else frames + hops - 1
    axis = const("axis", np.array([2], np.int64))
    signal = x
    if frames is None:
        dims = add("Shape", [x], [3], dtype=ir.DataType.INT64)
        index = const("length_index", np.array([2], np.int64))
        length = add("Gather", [dims, index], [1], dtype=ir.DataType.INT64)
        hop_size = const("hop", np.array([stride], np.int64))
        whole = add("Div", [length, hop_size], [1], dtype=ir.DataType.INT64)
        end = add("Mul", [whole, hop_size], [1], dtype=ir.DataType.INT64)
        start = const("start", np.array([0], np.int64))
        signal = add("Slice", [x, start, end, axis], [batch, 1, None])
    elif blocks * stride != x.shape[2]:
        start = const("start", np.array([0], np.int64))
        end = const("end", np.array([blocks * stride], np.int64))
        signal = add("Slice", [x, start, end, axis], [batch, 1, blocks * stride])
    shape = const("blocks_shape", np.array([0, -1, stride], np.int64))
    chunks = add("Reshape", [signal, shape], [batch, blocks, stride])
    pieces = [chunks]
    if hops > 1:
        one = const("frames_axis", np.array([1], np.int64))
        last = np.iinfo(np.int64).max
        pieces = [
            add(
                "Slice",
                [
                    chunks,
                    const("hop_start", np.array([hop], np.int64)),
                    const(
                        "hop_end",
                        np.array([hop - hops + 1 if hop < hops - 1 else last], np.int64),
                    ),
                    one,
                ],
                [batch, frames, stride],
            )
            for hop in range(hops)
        ]
    kernel = hops * stride
    framed = (
        pieces[0] if hops == 1 else add("Concat", pieces, [batch, frames, kernel], {"axis": 2})
    )
    matrix = const("weight", np.ascontiguousarray(weight.reshape(channels, kernel).T))
    y = add("MatMul", [framed, matrix], [batch, frames, channels])
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        bias = constant_array(conv.inputs[2]).astype(weight.dtype)
        y = add("Add", [y, const("bias", bias)], [batch, frames, channels])
    out = add("Transpose", [y], [batch, channels, frames], {"perm": [0, 2, 1]})
    replaced = [v for v in conv.inputs[1:] if v is not None]
    replace_keeping_name(graph, conv, out)
    for value in replaced:  # the Conv's own weights, now read by no one
        if not value.uses() and value.name in graph.initializers:
            del graph.initializers[value.name]
