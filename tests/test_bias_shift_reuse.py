"""Bias correction gives back a node's shift while what it is computed from is the same.

The recipe corrects every bias again for each raise it scores; a raise changes the plan of
one node (and those made float with it), so the other nodes' shifts are those computed
before. Each is reused only while its weight and original are the same objects and its
weight's quantization and input mean the same values, and the biases are the same bits as
a correction that computes every shift.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from qconvert import qparams, testing
from qconvert.passes import bias_correct
from qconvert.passes.bias_correct import correct_biases


def _gemm(seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 16))
    model = ir.serde.deserialize_model(testing.gemm_bias(w, rng.standard_normal(4)))
    node = next(iter(model.graph))
    mean = rng.standard_normal(16) + 1.0
    return model, node, mean


def _plan(node, scale_by: float = 1.0):
    weight = node.inputs[1].const_value.numpy()
    params = qparams.weight_qparams(weight, np.int8, axis=0)
    params = qparams.QParams(
        scale=(params.scale * np.float32(scale_by)).astype(np.float32),
        zero_point=params.zero_point,
        axis=params.axis,
    )
    return SimpleNamespace(tensors={node.inputs[1].name: SimpleNamespace(qparams=params)})


def _corrected(model, plan, mean, known, originals=None):
    """The bias of a copy of `model` (its weights shared), corrected with `plan`."""
    node = next(iter(model.clone().graph))
    correct_biases(plan, [node], {node.inputs[0].name: mean}, originals, known)
    return node.inputs[2].const_value.numpy().copy()


def _counted(monkeypatch) -> list[int]:
    computed = []
    real = bias_correct._shift
    monkeypatch.setattr(
        bias_correct, "_shift", lambda *args: computed.append(1) or real(*args)
    )
    return computed


def test_a_shift_is_reused_while_its_inputs_are_the_same(monkeypatch):
    model, node, mean = _gemm()
    plan = _plan(node)
    computed = _counted(monkeypatch)
    alone = _corrected(model, plan, mean, None)
    known: dict = {}
    first = _corrected(model, plan, mean, known)
    # Another copy (clones share their weights): the same shift, not computed again.
    again = _corrected(model, _plan(node), mean.copy(), known)
    assert len(computed) == 2  # alone, first; not again
    assert np.array_equal(first, alone) and np.array_equal(again, alone)
    assert not np.allclose(alone, node.inputs[2].const_value.numpy())  # a correction


def test_a_shift_is_computed_again_when_its_quantization_or_mean_changes(monkeypatch):
    model, node, mean = _gemm()
    known: dict = {}
    _corrected(model, _plan(node), mean, known)
    computed = _counted(monkeypatch)
    coarser = _corrected(model, _plan(node, scale_by=3.0), mean, known)
    assert np.array_equal(coarser, _corrected(model, _plan(node, scale_by=3.0), mean, None))
    moved = _corrected(model, _plan(node, scale_by=3.0), mean + 0.5, known)
    assert np.array_equal(
        moved, _corrected(model, _plan(node, scale_by=3.0), mean + 0.5, None)
    )
    assert not np.array_equal(coarser, moved)
    assert len(computed) == 4  # each of the two changes, with and without `known`


def test_the_shift_of_a_rounded_weight_is_not_kept():
    model, node, mean = _gemm()
    weight = node.inputs[1].const_value.numpy()
    known: dict = {}
    rounded = _corrected(model, _plan(node), mean, known, originals={"gemm": weight * 1.01})
    assert known == {}
    assert not np.array_equal(rounded, _corrected(model, _plan(node), mean, None))
