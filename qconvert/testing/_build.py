"""The two pieces every builder shares: seeded weights, and a model from ONNX text."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper


def random_weights(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    """Standard-normal float32 weights of `shape`, times `scale`, drawn from `rng`."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def checked_model(text: str, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model `text` (ONNX text syntax) describes, with `initializers`, checked in full."""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(array, name) for name, array in initializers.items()
    )
    onnx.checker.check_model(model, full_check=True)
    return model
