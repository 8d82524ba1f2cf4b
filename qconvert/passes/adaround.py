"""Adaptive rounding of layer weights (AdaRound-style, Nagel et al. 2020), per layer.

Rounding each weight to its nearest grid point minimises each weight's own error, not the
layer's. Every output of these layers is a dot product of one column of weights with a
vector of inputs: a row of a MatMul/Gemm input, or for a Conv the patch of input values
under the kernel at one output position (K = input channels per group x kernel taps).
With X those vectors on the calibration samples (rows) and H = X^T X, the layer's output
error for output channel o is

    || X (w_q - w) ||^2 = e^T H e,    e = w_q - w (one column of the weight)

and each weight may round down or up (e_i is its floor or ceil residual). Starting from
nearest rounding, we sweep the weights and flip one whenever that lowers e^T H e: flipping
e_i by d changes it by 2 d (H e)_i + d^2 H_ii, and H e is updated in O(K). This is the
layer-wise objective of AdaRound minimised by coordinate descent instead of its continuous
relaxation. The chosen values are written back as exact grid points, so the rewrite's
round-to-nearest gives exactly these integers.

A grouped Conv has one H per group (a depthwise Conv: one 9 x 9 H per channel for a 3x3
kernel), and the groups are swept together. A ConvTranspose is the Conv of its input
spread out by the stride (zeros between) with the kernel flipped, so its patches are taken
there. Conv patches are drawn at `MAX_ROWS` output positions at most, spread evenly over
the samples and positions: H of a 56 x 56 map from every position costs about as much as
nine float passes of the layer.

Applies to the quantized Conv and ConvTranspose (1-D and 2-D, explicit or VALID padding),
Gemm (transA = 0) and MatMul nodes of a static plan with a constant weight, per-tensor or
per-channel, of at most `MAX_INPUTS` inputs per output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qconvert import qparams
from qconvert.budgeted_runs import runs_within
from qconvert.graph_utils import constant_array
from qconvert.plan import QuantPlan, Role

SWEEPS = 3
"""Passes over the weights; flips become rare after two or three."""
MAX_INPUTS = 2048
"""Layers with more inputs per output keep nearest rounding: each sweep costs K x K x O and
H takes K x K x 8 bytes (a 4096-wide layer: 128 MiB, minutes of sweeps)."""
MAX_ROWS = 2048
"""Conv patches H is built from, at most: as many as the largest K of `MAX_INPUTS`, so H is of
full rank, at a bounded cost of M x K x K per layer (an 18-layer residual CNN at 224: 2048 rows
instead of 4096 took the recipe's float measurements from 28 s to about 15 s)."""
BLOCK = 32
"""Weights `_descend` visits between updates of the whole H e (32: fastest of 16-128 on
960- and 1152-wide layers)."""
GRAM_BYTES = 24 << 20
"""The most bytes of H measured in one float pass (one layer's at least). The models are
byte-identical whatever it is (each layer's H sums its own rows in the same order whichever
layers share its pass); it trades passes for memory. H of every layer at once held a
50-layer depthwise-separable 224 CNN at 104 MB, against 356 MB for the whole of
onnxruntime's quantize_static. At 64 MB the bench's 224 CNNs took 2, 1 and 1 passes, at
24 MB 6, 3 and 3, and `--adaround` on them ran 20-30% faster at 64 MB. But a pass's H is
held beside its session and patches, and the first pass's is measured in bias correction's
float pass and kept until rounding takes it (`FloatInputs.grams`): on a 320x320 detector
(141 MB of H in all) the default recipe peaked at 344 MB with 64 MB and 274 MB with 24 MB
(onnxruntime's quantize_static: 264-276 MB), for 20% more CPU time."""
PENDING_BYTES = 1 << 20
"""The most bytes of patches `GramAccumulator` holds for one layer between products: it
holds them for every layer at once (8 MB each held the recipe of a 224 inverted-residual
CNN at 800 MB)."""
CONV_OPS = frozenset({"Conv", "ConvTranspose"})


@dataclass(frozen=True, slots=True)
class Rounded:
    """What adaptive rounding gained on one layer (output error energy, calibration data)."""

    node: str
    error_before: float
    error_after: float


def adaround_nodes(model: ir.Model, plan: QuantPlan) -> list[ir.Node]:
    """The quantized layers whose constant weight the plan quantizes and rounding serves."""
    quantized = {node.name for node in plan.quantized_nodes()}
    nodes = []
    for node in model.graph:
        if node.name not in quantized or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = constant_array(node.inputs[1])
        decision = plan.tensors.get(node.inputs[1].name) if weight is not None else None
        if decision is None or decision.role is not Role.WEIGHT:
            continue
        if len(list(node.inputs[1].uses())) != 1 or _inputs_per_output(node, weight) is None:
            continue
        nodes.append(node)
    return nodes


def _inputs_per_output(node: ir.Node, weight: np.ndarray) -> int | None:
    """K, the length of the dot products the node computes; None where it cannot be served."""
    if node.op_type in ("Gemm", "MatMul"):
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return None
        if weight.ndim != 2:
            return None
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        k = weight.shape[1 if transposed else 0]
    elif node.op_type in CONV_OPS:
        if weight.ndim not in (3, 4):
            return None
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        group = node.attributes.get_int("group", 1)
        if node.op_type == "Conv":
            k = weight.shape[1] * int(np.prod(weight.shape[2:]))
        else:
            k = weight.shape[0] // group * int(np.prod(weight.shape[2:]))
    else:
        return None
    return k if k <= MAX_INPUTS else None


def gram_matrices(runs: Iterable[Mapping[str, np.ndarray]], names: list[str]):
    """H = X^T X of each named tensor, rows being its last-axis vectors (MatMul, Gemm)."""
    result: dict[str, np.ndarray] = {}
    for run in runs:
        for name in names:
            values = np.asarray(run[name], dtype=np.float64)
            rows = values.reshape(-1, values.shape[-1])
            gram = np.einsum("nk,nl->kl", rows, rows)
            result[name] = result[name] + gram if name in result else gram
    return result


def layer_grams(
    runs: Iterable[Mapping[str, np.ndarray]], nodes: list[ir.Node], samples: int
) -> dict[str, np.ndarray]:
    """H of each node (by name), [groups, K, K], from its float inputs in `runs`.

    `samples` is the number of runs, to spread the `MAX_ROWS` Conv patches over them.
    """
    grams = GramAccumulator(nodes, samples)
    for run in runs:
        grams.update(run)
    return grams.result()


class GramAccumulator:
    """Streams runs into the H of each node (see `layer_grams`).

    Rows are gathered and multiplied in blocks of `MAX_ROWS` rows or `PENDING_BYTES`,
    whichever comes first: few products for the narrow layers, and a bounded hold for the
    wide ones (the patches of a wide depthwise layer, a few thousand groups of 25 taps,
    would otherwise hold hundreds of MB each, for every layer at once, until the last
    sample). The products run on one BLAS thread (`weight_passes.one_blas_thread`), so
    small ones cost no thread wake-ups.

    Rows wait for their product in the tensor's own float type (`_held_dtype`) and are
    widened to float64 once, when their block is multiplied: float32 and float16 values
    are exact in float64, so H is the same bits, and the rows every layer holds at once
    take half the bytes (or a quarter) of float64 ones.
    """

    def __init__(self, nodes: list[ir.Node], samples: int) -> None:
        self.nodes = nodes
        self.per_sample = max(1, -(-MAX_ROWS // max(samples, 1)))
        self.grams: dict[str, np.ndarray] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.positions: dict[tuple, tuple[np.ndarray, np.ndarray] | None] = {}
        """`_patch_index` by its arguments: the same positions for every sample."""
        self.scratch = np.empty(0)
        """Where a block of columns of a product to add to an H already begun is written
        (at most `PENDING_BYTES`): kept from one product to the next, as one made anew
        for each was mapped and zeroed by the kernel per flush."""

    def update(self, run: Mapping[str, np.ndarray]) -> None:
        """Adds one sample's float inputs."""
        for node in self.nodes:
            values = run.get(node.inputs[0].name)
            if values is None:
                continue
            values = np.asarray(values)
            if node.op_type in CONV_OPS:
                rows = _patches(
                    node, values, self.per_sample, self.positions, dtype=_held_dtype(values)
                )
            else:
                rows = values.astype(_held_dtype(values)).reshape(1, -1, values.shape[-1])
            if rows is None:
                continue
            name = node.name or ""
            pending = self.pending.setdefault(name, [])
            pending.append(rows)
            # Counted as the float64 rows they become: the blocks, and so H's sums, are
            # those of rows held as float64.
            if (
                sum(part.shape[1] for part in pending) >= MAX_ROWS
                or sum(part.size for part in pending) * 8 >= PENDING_BYTES
            ):
                self._flush(name)

    def result(self) -> dict[str, np.ndarray]:
        """H of each node seen."""
        for name in list(self.pending):
            self._flush(name)
        self.scratch = np.empty(0)
        return self.grams

    def _flush(self, name: str) -> None:
        # Widened here, exactly: the product is that of the float64 rows.
        rows = np.concatenate(self.pending.pop(name), axis=1, dtype=np.float64)
        if name not in self.grams:
            self.grams[name] = np.matmul(rows.transpose(0, 2, 1), rows)
            return
        # Added to H a block of columns at a time: the product whole took a scratch as
        # large as H (12.5 MB of a 1,280-wide Conv) beside it. Its sums are those of
        # another BLAS routine, so H may differ from the whole product's in the last bits.
        groups, _, inputs = rows.shape
        width = max(1, min(inputs, PENDING_BYTES // (groups * inputs * 8)))
        if self.scratch.size < groups * inputs * width:
            self.scratch = np.empty(groups * inputs * width)
        gram = self.grams[name]
        for start in range(0, inputs, width):
            stop = min(inputs, start + width)
            block = self.scratch[: groups * inputs * (stop - start)]
            block = block.reshape(groups, inputs, stop - start)
            np.matmul(rows.transpose(0, 2, 1), rows[:, :, start:stop], out=block)
            gram[:, :, start:stop] += block


def _patches(
    node: ir.Node,
    x: np.ndarray,
    wanted: int,
    positions: dict | None = None,
    dtype: np.dtype | type = np.float64,
) -> np.ndarray | None:
    """[groups, rows, K] input patches of a Conv/ConvTranspose: `wanted` positions a sample.

    K is ordered as the weight's input channels, then its taps. `positions` keeps the
    gather positions worked out (`_patch_index`) for the next sample of the same shape.
    `dtype`: the patches' type (float64 unless the caller widens them later).
    """
    weight = constant_array(node.inputs[1])
    spatial = weight.ndim - 2
    if x.ndim != spatial + 2:
        return None
    if spatial == 1:  # a 1-D layer is a 2-D one of height 1
        x, weight = x[:, :, None, :], weight[:, :, None, :]
    group = node.attributes.get_int("group", 1)
    kernel = weight.shape[2:]
    dilations = _ints(node, "dilations", spatial, 1)
    strides = _ints(node, "strides", spatial, 1)
    pads = _ints(node, "pads", 2 * spatial, 0)
    if spatial == 1:
        dilations, strides = (1, *dilations), (1, *strides)
        pads = (0, pads[0], 0, pads[1])
    if node.op_type == "ConvTranspose":
        # The Conv of the input spread out by the stride, kernel flipped, stride 1.
        batch, channels, height, width = x.shape
        spread = np.zeros(
            (batch, channels, (height - 1) * strides[0] + 1, (width - 1) * strides[1] + 1),
            dtype=x.dtype,
        )
        spread[:, :, :: strides[0], :: strides[1]] = x
        before = [(k - 1) * d - p for k, d, p in zip(kernel, dilations, pads[:2], strict=True)]
        if min(before) < 0:
            return None
        x = spread
        strides = (1, 1)
        pads = (before[0], before[1], before[0], before[1])
    height, width = x.shape[2:]
    key = (tuple(kernel), tuple(dilations), tuple(strides), tuple(pads), height, width, wanted)
    if positions is None:
        index = _patch_index(*key)
    else:
        if key not in positions:
            positions[key] = _patch_index(*key)
        index = positions[key]
    if index is None:
        return None
    flat, inside = index
    chosen = flat.shape[0]
    # One gather by flat position, zeros written in place, and one copy that both
    # reorders and casts to `dtype`: the same values as gathering in 2-D, masking,
    # casting and reordering, in two passes over the patches instead of four (the
    # recipe's weight rounding gathers patches of every layer for every sample).
    batch, channels = x.shape[:2]
    gathered = np.take(x.reshape(batch, channels, height * width), flat, axis=2)
    if not inside.all():
        np.copyto(gathered, 0, where=~inside)  # [N, C, P, taps]
    if node.op_type == "ConvTranspose":
        gathered = gathered[..., ::-1]  # the flipped kernel: tap t reads weight tap -1 - t
    per_group = channels // group
    taps = flat.shape[1]
    patches = np.empty((group, batch, chosen, per_group, taps), dtype)
    patches[...] = gathered.reshape(batch, group, per_group, chosen, taps).transpose(
        1, 0, 3, 2, 4
    )  # [G, N, P, C/G, taps]
    return patches.reshape(group, batch * chosen, -1)


def _held_dtype(values: np.ndarray) -> np.dtype:
    """The type rows of `values` wait in: their own where float64 holds it exactly."""
    if values.dtype in (np.float16, np.float32):
        return values.dtype
    return np.dtype(np.float64)


def _patch_index(kernel, dilations, strides, pads, height, width, wanted):
    """Where `_patches` gathers: (flat input position, inside the unpadded input), [P, taps].

    None where the layer has no output position.
    Padded coordinates are read from the input shifted by the leading pads, zero outside
    it: only the chosen patches are gathered, never a padded copy of the whole input.
    `GramAccumulator` keeps them by shape (read-only) while it runs: it gathers every
    layer's patches for every sample, and working the same positions out again took a
    third of the gathering.
    """
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    out = [
        (size + pads[i] + pads[i + 2] - reach[i]) // strides[i] + 1
        for i, size in enumerate((height, width))
    ]
    if min(out) < 1:
        return None
    positions = out[0] * out[1]
    chosen = np.unique(np.linspace(0, positions - 1, min(wanted, positions)).astype(int))
    oy, ox = chosen // out[1], chosen % out[1]
    ky, kx = np.meshgrid(np.arange(kernel[0]), np.arange(kernel[1]), indexing="ij")
    rows_y = oy[:, None] * strides[0] + ky.reshape(1, -1) * dilations[0] - pads[0]  # [P, taps]
    rows_x = ox[:, None] * strides[1] + kx.reshape(1, -1) * dilations[1] - pads[1]
    inside = (rows_y >= 0) & (rows_y < height) & (rows_x >= 0) & (rows_x < width)
    flat = np.clip(rows_y, 0, height - 1) * width + np.clip(rows_x, 0, width - 1)
    flat.flags.writeable = False
    inside.flags.writeable = False
    return flat, inside


def _ints(node: ir.Node, name: str, size: int, default: int) -> tuple[int, ...]:
    values = node.attributes.get_ints(name, None)
    return tuple(values) if values else (default,) * size


def rounding_key(node: ir.Node, plan: QuantPlan) -> tuple[str, str]:
    """What a layer's rounding depends on besides H: its name, float weights and grid."""
    weight_value = node.inputs[1]
    params = plan.tensors[weight_value.name].qparams
    digest = hashlib.sha256()
    for part in (constant_array(weight_value), params.scale, params.zero_point):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update(f"{params.axis} {params.dtype} {plan.scheme.reduce_range}".encode())
    return node.name or "", digest.hexdigest()


def gram_bytes(node: ir.Node) -> int:
    """Bytes of the node's H, [groups, K, K] float64 (0 where rounding cannot serve it)."""
    weight = constant_array(node.inputs[1])
    k = _inputs_per_output(node, weight) if weight is not None else None
    if k is None:
        return 0
    groups = node.attributes.get_int("group", 1) if node.op_type in CONV_OPS else 1
    return groups * k * k * 8


def gram_groups(nodes: list[ir.Node]) -> list[list[ir.Node]]:
    """`nodes` in order, cut into runs whose H together fit `GRAM_BYTES` (one at least)."""
    return runs_within(nodes, gram_bytes, GRAM_BYTES)


def adaround(
    plan: QuantPlan,
    nodes: list[ir.Node],
    grams: Mapping[str, np.ndarray],
    originals: dict[str, np.ndarray],
    chosen_before: dict | None = None,
) -> list[Rounded]:
    """Chooses each weight's rounding (see the module docstring) and writes it back.

    `grams` maps node names to H, [groups, K, K] (or the input name to a [K, K] H, as
    `gram_matrices` gives for MatMul/Gemm). The float weights it replaces are put in
    `originals` (by node name), for bias correction to measure the final rounding against.
    `chosen_before` keeps each layer's result by `rounding_key`: a layer rounded before
    on the same grid (the recipe re-runs rounding with other nodes kept float) is not
    swept again, and needs no H.
    """
    chosen_before = {} if chosen_before is None else chosen_before
    results = []
    for node in nodes:
        weight_value = node.inputs[1]
        key = rounding_key(node, plan)
        if key not in chosen_before:
            gram = grams.get(node.name or "")
            if gram is None:
                gram = grams.get(node.inputs[0].name)
            if gram is None:
                continue
            chosen = _round_layer(node, plan, gram if gram.ndim == 3 else gram[None])
            if chosen is None:
                continue
            chosen_before[key] = chosen
        values, before, after = chosen_before[key]
        originals[node.name or ""] = constant_array(weight_value)
        weight_value.const_value = ir.tensor(values, name=weight_value.name)
        results.append(Rounded(node.name or "", before, after))
    return results


def _round_layer(node: ir.Node, plan: QuantPlan, gram: np.ndarray):
    """(float32 weights on the grid, error energy before, after), or None if H misfits."""
    weight_value = node.inputs[1]
    # The model's float32 weight, read in place: dividing it by the float64 scale widens
    # each value exactly, as a float64 copy would, without holding that copy.
    weight = constant_array(weight_value)
    params = plan.tensors[weight_value.name].qparams
    scale = _broadcast(params.scale, params.axis, weight)
    zero = _broadcast(params.zero_point, params.axis, weight)
    to_columns, from_columns = _layout(node, weight.shape)
    columns = to_columns(weight)
    if columns.shape[:2] != gram.shape[:2]:
        return None
    scale, zero = to_columns(scale), to_columns(zero)
    low, high = qparams.integer_range(
        params.dtype, symmetric=True, reduce_range=plan.scheme.reduce_range
    )
    ideal = columns / scale + zero
    chosen = np.round(ideal)
    np.clip(chosen, low, high, out=chosen)
    before = _energy(gram, (chosen - ideal) * scale)
    chosen = _descend(gram, ideal, chosen, scale, low, high)
    after = _energy(gram, (chosen - ideal) * scale)
    return from_columns((chosen - zero) * scale).astype(np.float32), before, after


def _broadcast(values, axis: int | None, weight: np.ndarray) -> np.ndarray:
    """Per-tensor or per-channel (along `axis`) parameters spread to the weight's shape.

    A read-only view (`np.broadcast_to`), not a copy: a full-size float64 copy of the
    scale and of the zero point were two of the nine weight-sized arrays the rounding of
    one layer held at once (46 MB for a 1-D Conv of 512 x 256 x 5 weights).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return np.broadcast_to(values.reshape(()), weight.shape)
    shape = [1] * weight.ndim
    shape[axis if axis is not None else 0] = -1
    return np.broadcast_to(values.reshape(shape), weight.shape)


def _layout(node: ir.Node, shape: tuple[int, ...]):
    """Functions from the weight's layout to [groups, K, outputs per group] and back."""
    if node.op_type in ("Gemm", "MatMul"):
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            return (lambda w: w.T[None]), (lambda c: c[0].T)
        return (lambda w: w[None]), (lambda c: c[0])
    group = node.attributes.get_int("group", 1)
    if node.op_type == "Conv":  # [O, C/G, taps...]: output o reads its group's channels
        out_channels = shape[0]

        def to_columns(w):
            return w.reshape(group, out_channels // group, -1).transpose(0, 2, 1)

        def from_columns(c):
            return c.transpose(0, 2, 1).reshape(shape)

        return to_columns, from_columns
    # ConvTranspose: [C, O/G, taps...]; output o of group g reads the group's C/G channels
    in_channels, per_group_out = shape[0], shape[1]
    taps = int(np.prod(shape[2:]))

    def to_columns_t(w):
        w = w.reshape(group, in_channels // group, per_group_out, taps)
        return w.transpose(0, 1, 3, 2).reshape(group, -1, per_group_out)

    def from_columns_t(c):
        c = c.reshape(group, in_channels // group, taps, per_group_out).transpose(0, 1, 3, 2)
        return c.reshape(shape)

    return to_columns_t, from_columns_t


def _descend(gram, ideal, chosen, scale, low, high) -> np.ndarray:
    """Coordinate descent on e^T H e over the rounding choices, all columns at once.

    `gram` is [G, K, K], the others [G, K, O]: the groups are swept together. The weights
    are visited in order, in blocks of `BLOCK`: inside a block, a flip updates H e of the
    block's own weights only (the decisions there need nothing else); at the end of the
    block, one matrix product brings H e of all K weights up to date. The visits and their
    decisions are those of updating all of H e at every flip (up to the order its sums
    are taken in); the K x K x O multiply-adds of a sweep become K / `BLOCK` BLAS
    products instead of K rank-one updates.

    The block's arrays and the product's are written into buffers made once per layer
    (`_Blocks`): made anew for every block, each was mapped and zeroed by the kernel (a
    960-wide layer's H e of 320 outputs is 2.4 MB, its block 245 KB, past glibc's fixed
    mmap threshold, `memory`), with the same values and products.
    """
    chosen = chosen.copy()
    error = (chosen - ideal) * scale
    h_error = gram @ error  # [G, K, O]
    diagonal = np.diagonal(gram, axis1=1, axis2=2)  # [G, K]
    inputs = chosen.shape[1]
    blocks = _Blocks(gram, h_error)
    for _ in range(SWEEPS):
        flipped = 0
        for start in range(0, inputs, BLOCK):
            stop = min(start + BLOCK, inputs)
            local = blocks.local(h_error[:, start:stop])  # [G, B, O]: H e of the block
            block_gram = gram[:, start:stop, start:stop]
            moved = blocks.moved(stop - start)  # the error change of each flip, [G, B, O]
            for j in range(stop - start):
                i = start + j
                # The other way of rounding weight i: floor if it went up, ceil if down.
                step = np.where(chosen[:, i] > ideal[:, i], -1.0, 1.0)  # [G, O]
                candidate = chosen[:, i] + step
                allowed = (candidate >= low) & (candidate <= high)
                delta = step * scale[:, i]
                current = local[:, j]
                change = 2 * delta * current + delta**2 * diagonal[:, i, None]
                take = allowed & (change < -1e-12 * (1 + np.abs(current * delta)))
                if not take.any():
                    continue
                moved[:, j] = np.where(take, delta, 0.0)
                chosen[:, i] += np.where(take, step, 0.0)
                local += block_gram[:, :, j, None] * moved[:, None, j, :]
                flipped += int(take.sum())
            rows = np.flatnonzero(moved.any(axis=(0, 2)))
            if rows.size:
                h_error += blocks.product(start + rows, moved, rows)
        if not flipped:
            break
    return chosen


class _Blocks:
    """The reused buffers of `_descend`'s blocks, for one H [G, K, K] and H e [G, K, O].

    Each view handed out is C-contiguous and of the shape a fresh array would have, so
    the products are computed as on fresh arrays.
    """

    def __init__(self, gram: np.ndarray, h_error: np.ndarray) -> None:
        groups, inputs, outputs = h_error.shape
        width = min(BLOCK, inputs)
        self.shape = (groups, inputs, outputs)
        self.local_buffer = np.empty(groups * width * outputs)
        self.moved_buffer = np.empty(groups * width * outputs)
        self.rows_buffer = np.empty(groups * width * outputs)
        self.columns_buffer = np.empty(groups * inputs * width, dtype=gram.dtype)
        self.product_buffer = np.empty(h_error.shape)
        self.gram = gram

    def local(self, h_block: np.ndarray) -> np.ndarray:
        """A copy of H e of the block's weights, [G, B, O]."""
        local = self.local_buffer[: h_block.size].reshape(h_block.shape)
        np.copyto(local, h_block)
        return local

    def moved(self, width: int) -> np.ndarray:
        """Zeros, [G, width, O]."""
        groups, _, outputs = self.shape
        moved = self.moved_buffer[: groups * width * outputs].reshape(groups, width, outputs)
        moved.fill(0.0)
        return moved

    def product(self, columns: np.ndarray, moved: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """H[:, :, columns] @ moved[:, rows], [G, K, O] (valid until the next call)."""
        groups, inputs, outputs = self.shape
        count = rows.size
        left = self.columns_buffer[: groups * inputs * count].reshape(groups, inputs, count)
        np.take(self.gram, columns, axis=2, out=left)
        right = self.rows_buffer[: groups * count * outputs].reshape(groups, count, outputs)
        np.take(moved, rows, axis=1, out=right)
        return np.matmul(left, right, out=self.product_buffer)


def _energy(gram: np.ndarray, error: np.ndarray) -> float:
    return float(np.sum((gram @ error) * error))
