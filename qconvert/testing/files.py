"""Writing models and input samples to disk, and random inputs for a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Writes `model` to `path` and returns the path."""
    path = Path(path)
    onnx.save_model(model, str(path))
    return path


def save_with_external_data(model: onnx.ModelProto, path: str | Path) -> Path:
    """Writes `model` to `path` with every tensor in `<name>.data` beside it."""
    path = Path(path)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return path


def random_inputs(
    model: onnx.ModelProto, *, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every input; dynamic dims become `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else batch
            for d in value.type.tensor_type.shape.dim
        ]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def write_samples(folder: str | Path, samples: list[dict[str, np.ndarray]]) -> Path:
    """Writes samples as `s00000.npy` (one input) or `.npz` files; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, feeds in enumerate(samples):
        if len(feeds) == 1:
            np.save(folder / f"s{index:05d}.npy", next(iter(feeds.values())))
        else:
            np.savez(folder / f"s{index:05d}.npz", **feeds)
    return folder
