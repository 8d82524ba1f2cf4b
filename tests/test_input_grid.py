"""A graph input on a lattice the 8-bit grid misses is read in float by its first layers."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

import qconvert
from qconvert import testing
from qconvert.input_grid import first_readers, off_grid_inputs
from qconvert.pipelines.recipe_samples import held_out_indices
from qconvert.plan import QuantPlan, Role, TensorDecision
from qconvert.qparams import QParams
from qconvert.recipe_fidelity import Fidelity, balance_detail
from qconvert.recipe_result import RecipeOptions

SAMPLES = 48


def _pixels(rng: np.random.Generator, shape, *, offset: bool) -> np.ndarray:
    """Pixels 0..255 mapped to [-1, 1] (odd multiples of 1/255: off the grid) or to
    [0, 1] (multiples of 1/255: on it)."""
    p = rng.integers(0, 256, size=shape).astype(np.float32)
    return (p / 127.5 - 1.0).astype(np.float32) if offset else p / 255.0


def _plan_for(name: str, low: float, high: float) -> QuantPlan:
    """A plan holding only `name`'s minmax uint8 grid, as the planner derives it."""
    scale = np.float32((high - low) / 255.0)
    zero = np.uint8(round(-low / float(scale)))
    params = QParams(scale=np.array(scale), zero_point=np.array(zero))
    decision = TensorDecision(name=name, role=Role.ACTIVATION, qparams=params, reason="")
    return QuantPlan(scheme=None, tensors={name: decision}, nodes=(), folds=())


def _transpose_conv() -> onnx.ModelProto:
    """Transpose (NHWC -> NCHW) then a 3x3 Conv: input [N, 8, 8, 3]."""
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        transpose_conv (float[N,8,8,3] input) => (float[N,4,8,8] output) {
            nchw = Transpose <perm = [0,3,1,2]> (input)
            output = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (nchw, w)
        }
    """
    model = onnx.parser.parse_model(text)
    w = (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}"
    return model


def test_an_input_half_a_step_off_the_grid_is_found():
    rng = np.random.default_rng(0)
    ir_model = _ir(_transpose_conv())
    shape = (1, 8, 8, 3)
    offset = [{"input": _pixels(rng, shape, offset=True)} for _ in range(4)]
    on_grid = [{"input": _pixels(rng, shape, offset=False)} for _ in range(4)]
    continuous = [{"input": rng.uniform(-1, 1, shape).astype(np.float32)} for _ in range(16)]
    # [-1, 1] on scale 2/255, zero point 127 (or 128): the even multiples of 1/255.
    assert off_grid_inputs(ir_model, _plan_for("input", -1.0, 1.0), offset) == ("input",)
    # [0, 1] on scale 1/255, zero point 0: every pixel on a grid point.
    assert off_grid_inputs(ir_model, _plan_for("input", 0.0, 1.0), on_grid) == ()
    # A continuous input is no lattice: 3,072 distinct values.
    assert off_grid_inputs(ir_model, _plan_for("input", -1.0, 1.0), continuous) == ()
    # Not quantized: nothing to miss.
    assert off_grid_inputs(ir_model, _plan_for("other", -1.0, 1.0), offset) == ()


def _ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def test_the_first_readers_are_found_through_pass_through_ops():
    assert first_readers(_ir(_transpose_conv()), ["input"]) == ("n0", "n1")


def test_the_recipe_reads_an_off_grid_input_in_float(tmp_path):
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    samples = [{"input": _pixels(rng, (1, 3, 8, 8), offset=True)} for _ in range(SAMPLES)]
    testing.write_samples(tmp_path / "calib", samples)
    # Its Conv holds 92% of this small model's work: over the default 5% budget.
    report = qconvert.quantize(path, tmp_path / "q.onnx", data=tmp_path / "calib")
    step = next(t for t in report.conversion.recipe.trials if t.step == "float input")
    assert step.after is None and "of the multiply-accumulates, over the 5% budget" in (
        step.detail
    )
    report = qconvert.quantize(
        path,
        tmp_path / "q.onnx",
        data=tmp_path / "calib",
        recipe=RecipeOptions(budget=1.0),
        force=True,
    )
    recipe = report.conversion.recipe
    step = next(t for t in recipe.trials if t.step == "float input")
    assert step.kept, report.conversion.notes
    # The report names the layers that read the input in float, and what they cost.
    assert re.search(r"; read in float by \S+.*\(\d+\.\d\d% of the MACs\)$", step.detail)
    assert "float input" in recipe.kept
    # The written model reads the input in float: no QuantizeLinear on it, and it beats
    # the single pass on the held-out samples.
    written = onnx.load(tmp_path / "q.onnx")
    assert not any(
        n.op_type == "QuantizeLinear" and "input" in n.input for n in written.graph.node
    )
    qconvert.quantize(path, tmp_path / "fast.onnx", data=tmp_path / "calib", recipe="fast")
    held = [samples[i] for i in held_out_indices(SAMPLES)]
    gained = testing.output_sqnr(path, tmp_path / "q.onnx", held) - testing.output_sqnr(
        path, tmp_path / "fast.onnx", held
    )
    assert gained > 1.0


def test_an_input_on_the_grid_is_not_tried(tmp_path):
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    samples = [{"input": _pixels(rng, (1, 3, 8, 8), offset=False)} for _ in range(SAMPLES)]
    testing.write_samples(tmp_path / "calib", samples)
    report = qconvert.quantize(path, tmp_path / "q.onnx", data=tmp_path / "calib")
    step = next(t for t in report.conversion.recipe.trials if t.step == "float input")
    assert step.after is None
    assert step.detail == "no quantized graph input on a lattice the 8-bit grid misses"


def _sqnrs(values: list[float]) -> Fidelity:
    return Fidelity(
        sqnr_db=float(np.mean(values)), top1_agreement=None, per_sample_db=tuple(values)
    )


def test_a_removed_rounding_is_kept_unless_it_loses_more_samples_than_it_wins():
    before = _sqnrs([10.0] * 16)
    # Better over all, on 6 samples, worse on 5: too few for the sign test (10 of 11),
    # enough for a step that only takes a rounding away.
    mixed = _sqnrs([11.0] * 6 + [9.9] * 5 + [10.0] * 5)
    assert not mixed.improves(before)
    assert mixed.better_on_balance(before)
    assert balance_detail(mixed, before) == "better on 6/16 samples, worse on 5"
    # Worse on more samples than better, or worse over all: dropped.
    assert not _sqnrs([12.0] * 5 + [9.9] * 6 + [10.0] * 5).better_on_balance(before)
    assert not _sqnrs([10.05] * 16).better_on_balance(before)
