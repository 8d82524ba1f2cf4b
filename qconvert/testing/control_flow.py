"""Graphs with subgraphs: a Loop whose body reads an outer-scope weight."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from qconvert.testing._build import random_weights


def loop_matmul_relu(trips: int = 3, *, seed: int = 0) -> onnx.ModelProto:
    """A Loop of `trips` iterations, x = Relu(x @ w), on input [N,8].

    The weight `w` is a main-graph initializer the body reads from the outer scope.
    """
    body = [
        helper.make_node("MatMul", ["x_in", "w"], ["y"], name="body_mm"),
        helper.make_node("Relu", ["y"], ["x_out"], name="body_relu"),
    ]
    return _loop("loop_matmul_relu", body, trips, seed, {})


def loop_matmul_scaled_sigmoid(trips: int = 2, *, seed: int = 0) -> onnx.ModelProto:
    """A Loop of `trips` iterations, x = Sigmoid(0.5 * (x @ w)): a Mul the planner folds.

    An Identity writes the carried value, so the Sigmoid (not a graph output) runs
    quantized and the MatMul's output, which it reads through the Mul, is quantized too.
    """
    body = [
        helper.make_node("MatMul", ["x_in", "w"], ["y"], name="body_mm"),
        helper.make_node("Mul", ["y", "half"], ["z"], name="body_scale"),
        helper.make_node("Sigmoid", ["z"], ["s"], name="body_sigmoid"),
        helper.make_node("Identity", ["s"], ["x_out"], name="body_out"),
    ]
    return _loop("loop_scaled", body, trips, seed, {"half": np.array(0.5, np.float32)})


def _loop(
    name: str, body_nodes: list, trips: int, seed: int, constants: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """A Loop over `body_nodes` (x_in -> x_out on [N,8]) reading outer `w` and `constants`."""
    weights = random_weights(np.random.default_rng(seed), 8, 8, scale=0.3)
    body = helper.make_graph(
        [
            *body_nodes,
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["N", 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["N", 8]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "input"], ["output"], body=body, name="loop")],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8])],
        [
            onnx.numpy_helper.from_array(weights, "w"),
            onnx.numpy_helper.from_array(np.array(trips, np.int64), "trips"),
            *(onnx.numpy_helper.from_array(v, k) for k, v in constants.items()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
