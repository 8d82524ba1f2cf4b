"""A quantize run of a model built in code, as the plan-rule tests make it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from qconvert.testing.files import save, write_samples


def quantize_fast(
    model: onnx.ModelProto,
    folder: Path,
    name: str,
    samples: list[dict[str, np.ndarray]],
    overrides: str | None = None,
):
    """Quantizes `model` with `--recipe fast` on `samples`, with an overrides file's text.

    The samples are written once per folder (`folder/calib`); the model goes to
    `folder/<name>.model.onnx` and the result to `folder/<name>.onnx`.

    Returns:
        (the model's path, the output's path, {float node: reason}, the report).
    """
    import qconvert
    from qconvert.config import QuantizeConfig
    from qconvert.overrides import load_overrides

    path = save(model, folder / f"{name}.model.onnx")
    calib = folder / "calib"
    if not calib.exists():
        write_samples(calib, samples)
    out = folder / f"{name}.onnx"
    config = QuantizeConfig()
    if overrides is not None:
        file = folder / f"{name}.toml"
        file.write_text(overrides)
        config = QuantizeConfig(overrides=load_overrides(file))
    report = qconvert.quantize(path, out, data=calib, config=config, recipe="fast")
    floats = {node.name: node.reason for node in report.conversion.float_nodes}
    return path, out, floats, report
