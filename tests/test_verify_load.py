"""A model the ONNX checker passes and onnxruntime cannot load fails every check alike."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qconvert import testing
from qconvert.errors import VerificationError
from qconvert.verify import verify_loads, verify_model, verify_structure

LOAD_ERROR = "onnxruntime cannot load the converted model"


def _unloadable(tmp_path) -> tuple[bytes, str]:
    """matmul_add with an op of a domain the checker leaves alone and onnxruntime lacks."""
    model = testing.matmul_add()
    model.opset_import.append(onnx.helper.make_opsetid("qconvert.test", 1))
    model.graph.node[1].domain = "qconvert.test"
    onnx.checker.check_model(model)  # valid ONNX: the checker does not know the domain
    path = testing.save(model, tmp_path / "model.onnx")
    return model.SerializeToString(), str(path)


def test_a_model_onnxruntime_cannot_load_fails_each_check_with_one_message(tmp_path):
    data, path = _unloadable(tmp_path)
    feeds = {"input": np.zeros((1, 4, 16), np.float32)}
    checks = [
        lambda: verify_model(data, feeds),
        lambda: verify_model(data, feeds, audit=False),
        lambda: verify_loads(path),
        lambda: verify_structure(data),
    ]
    for check in checks:
        with pytest.raises(VerificationError, match=LOAD_ERROR):
            check()


def test_the_same_model_with_its_own_op_passes_every_check(tmp_path):
    model = testing.matmul_add()
    path = testing.save(model, tmp_path / "model.onnx")
    feeds = {"input": np.zeros((1, 4, 16), np.float32)}
    verify_model(model.SerializeToString(), feeds, audit=False)
    verify_loads(str(path))
    verify_structure(model.SerializeToString())
