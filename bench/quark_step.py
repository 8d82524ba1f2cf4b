"""AMD Quark's ONNX quantizer, the second peer: run by `bench.steps.quark_quantize` in the
interpreter of its own virtual environment (.venv-quark, which `make bench` makes).

Quark pins onnx below the version qconvert installs and imports torch, so it lives apart:
this script needs only numpy from the bench (bench.data) and Quark itself.

    .venv-quark/bin/python -m bench.quark_step --model M --data D --output O --recipe R

Recipes (both: unsigned 8-bit activations, which onnxruntime's CPU kernels run fast, and
signed 8-bit per-channel weights; the model is first upgraded to opset 17, since Quark's
per-channel QDQ needs opset 13 or later):
- default: Quark's own defaults otherwise (Percentile activation ranges, no algorithm);
- best: its strongest CPU recipe for CNNs in its docs: cross-layer equalization, then
  AdaRound (bias correction is subsumed by AdaRound's layer-output reconstruction, and
  Quark's auto mixed precision raises layers to 16-bit activations, which onnxruntime's
  CPU runs in float, so it trades away the int8 speed the bench measures).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# 100 AdaRound iterations a layer (Quark's default is 1000): on these 2 shared cores one
# layer of Magika took 200 s for 300 iterations, and EfficientNet-Lite0 has 50 layers; at
# 1000 the recipe would take hours a model, past the bench's 15-minute step limit.
ADAROUND_ITERATIONS = 100
OPSET = 17


def adaround_progress(log: str) -> str:
    """How far Quark's AdaRound got, from its log (stderr): layers done of all, and the
    seconds a layer took (its ONNX inference over the samples, its torch training), so a
    run cut at the time limit still says what the whole recipe would have cost."""
    import re

    stages = [
        f"{name} at {at} s"
        for at, name in re.findall(
            r"quark at (\d+) s\n(?:[^\n]*\n)?[^\n]*?Start (?:running |applying )?(\w+)", log
        )
    ]
    started = f" ({', '.join(stages)})" if stages else ""
    tail = log[log.find("FastFinetune") :] if "FastFinetune" in log else ""
    if not tail:
        return "AdaRound not started" + started
    # tqdm's bar: "k/N [" where N is the number of layers Quark fine-tunes.
    totals = re.findall(r"(\d+)/(\d+) \[", tail)
    layers = int(totals[-1][1]) if totals else None
    seconds: dict[str, list[float]] = {"onnx inference": [], "torch training": []}
    for kind, value in re.findall(
        r"finetuning layer \d+, (onnx inference|torch training)[^\n]*?consumed ([\d.]+)s", tail
    ):
        seconds[kind].append(float(value))
    done = len(seconds["torch training"])
    if not done:
        return f"AdaRound on its first of {layers or '?'} layers{started}"
    infer = sum(seconds["onnx inference"][:done]) / done
    train = sum(seconds["torch training"]) / done
    text = (
        f"AdaRound finished {done} of {layers or '?'} layers, {infer + train:.0f} s a layer "
        f"({infer:.0f} s ONNX inference + {train:.0f} s torch training)"
    )
    if layers:
        text += f": about {(infer + train) * layers:.0f} s for all"
    return text + started


def _reader(model: str, data: str):
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    from bench.data import read_folder

    graph = onnx.load(model, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    ranks = {
        i.name: len(i.type.tensor_type.shape.dim)
        for i in graph.input
        if i.name not in initializers
    }
    samples = read_folder(Path(data), ranks)

    class FolderReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0
            self.samples = samples

        def get_next(self):
            if self.index >= len(samples):
                return None
            self.index += 1
            return samples[self.index - 1]

        def rewind(self) -> None:  # Quark's algorithms read the samples more than once
            self.index = 0

    return FolderReader()


def _config(recipe: str, method: str = "Percentile"):
    from quark.onnx import (
        AdaRoundConfig,
        CLEConfig,
        Int8Spec,
        QConfig,
        QLayerConfig,
        QuantGranularity,
        UInt8Spec,
    )
    from quark.onnx.quantization.config.spec import CalibMethod

    layer = QLayerConfig(
        input_tensors=UInt8Spec(calibration_method=getattr(CalibMethod, method)),
        weight=Int8Spec(quant_granularity=QuantGranularity.Channel),
    )
    algorithms = []
    if recipe == "best":
        algorithms = [
            CLEConfig(),
            AdaRoundConfig(num_iterations=ADAROUND_ITERATIONS, learning_rate=0.1),
        ]
    return QConfig(
        global_config=layer,
        algo_config=algorithms,
        extra_options={"ForceQuantizeNoInputCheck": True},
    )


def fixed_shapes(proto, samples: list[dict]) -> list[str]:
    """Gives the graph inputs the shape of the first sample (the bench's samples of a model
    all have one shape); returns the inputs that had a dynamic dimension.

    Quark's AdaRound runs each layer on a fixed-shape batch, and with a dynamic input it
    writes a model onnxruntime does not load (issue 16: YOLOv8n), so Quark gets the shape
    the samples have, as a user would fix it by hand.
    """
    changed = []
    for graph_input in proto.graph.input:
        if graph_input.name not in samples[0]:
            continue
        shape = samples[0][graph_input.name].shape
        dims = graph_input.type.tensor_type.shape.dim
        if len(dims) != len(shape) or all(d.HasField("dim_value") for d in dims):
            continue
        changed.append(graph_input.name)
        for dim, size in zip(dims, shape, strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    return changed


def quantize(model: str, data: str, output: str, recipe: str) -> tuple[float, list[str]]:
    """Quantizes `model` into `output`; returns the seconds Quark took (upgrade included)
    and notes on what the bench changed for Quark to run."""
    import onnx
    from onnx import version_converter
    from quark.onnx import ModelQuantizer

    started = time.perf_counter()
    reader = _reader(model, data)
    notes = []
    proto = onnx.load(model)
    default = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    with tempfile.TemporaryDirectory() as folder:
        if default < OPSET:
            proto = version_converter.convert_version(proto, OPSET)
            notes.append(f"opset {default} upgraded to {OPSET}")
        fixed = fixed_shapes(proto, reader.samples)
        if fixed:
            notes.append(f"input shapes fixed to the samples' ({', '.join(fixed)})")
        source = str(Path(folder) / "prepared.onnx")
        onnx.save(proto, source)
        try:
            ModelQuantizer(_config(recipe)).quantize_model(source, output, reader)
        except RuntimeError as exc:
            if "calibration failed" not in str(exc):
                raise
            # onnxruntime's HistogramCollector (Quark's Percentile calibrator) fails on a
            # tensor of one value above ~4,096 in magnitude: numpy widens a constant range
            # by +-0.5, which 2,048 float32 bins cannot split. Magika's LayerNorm sums
            # (9,141 and 161,333) did that while its input was dynamic; with the shape
            # fixed the run calibrates. Should another model hit it, Quark's MinMax runs.
            notes.append("Percentile calibration failed: MinMax ranges")
            reader.rewind()
            ModelQuantizer(_config(recipe, "MinMax")).quantize_model(source, output, reader)
    return time.perf_counter() - started, notes


STAGES = ("Start running calibration", "Start applying")  # Quark's log as a stage begins


class _Stamped:
    """sys.stderr, with `quark at N s` written before each line where a Quark stage begins
    (calibration, each algorithm), so a run cut at the time limit shows where time went."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.started = time.perf_counter()

    def write(self, text: str) -> int:
        if any(stage in text for stage in STAGES):
            self.stream.write(f"\nquark at {time.perf_counter() - self.started:.0f} s\n")
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quark_step")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--recipe", choices=("default", "best"), default="default")
    args = parser.parse_args()
    sys.stderr = _Stamped(sys.stderr)  # before Quark's loggers take the stream
    seconds, notes = quantize(args.model, args.data, args.output, args.recipe)
    print(f"quark seconds {seconds:.3f}")
    for note in notes:
        print(f"quark note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
