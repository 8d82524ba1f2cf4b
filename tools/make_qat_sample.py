"""Build the quantization-aware-trained sample model: ``sample_models/digits_qat``.

What: trains a small CNN on the same digits images and split as ``make_samples.py`` with
PyTorch's eager-mode quantization-aware training (``torch.ao.quantization.prepare_qat``:
FakeQuantize on every weight and activation, learned during training), then exports it
with ``torch.onnx.export`` to an ONNX QDQ model. The export keeps each weight as float32
behind a QuantizeLinear -> DequantizeLinear pair and each activation range as a Q -> DQ
pair, which is what QAT exports look like in the wild and what ``qconvert quantize``
finishes. It writes into ``<out>/digits_qat/``:

* ``model.onnx`` -- the exported QDQ model (input ``input`` ``[N,1,16,16]``, output
  ``logits`` ``[N,10]``);
* ``calib/`` and ``eval/`` -- the same samples as the other digits models.

Why a separate script: the other sample models are written node by node so that their
float graphs stay stable across torch versions; this one is about what the exporter
itself writes for a FakeQuantize model, so it uses the exporter.

Usage::

    python tools/make_qat_sample.py [--out sample_models]

Needs torch and scikit-learn (the dev-only ``samples`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.ao import quantization as tq

sys.path.insert(0, str(Path(__file__).parent))
from make_samples import (
    IMG,
    SEED,
    load_images,
    make_split,
    train,
    write_samples,
)

NAME = "digits_qat"
OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear need opset 13
EPOCHS = 30
QAT_EPOCHS = 8


# Plain FakeQuantize modules (the fused default has no ONNX export): uint8 activations,
# int8 symmetric per-channel weights, the layout onnxruntime's CPU kernels take.
QCONFIG = tq.QConfig(
    activation=tq.FakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8
    ),
    weight=tq.FakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
    ),
)


class DigitsQAT(nn.Module):
    """Conv(1→16)+ReLU → MaxPool → Conv(16→32)+ReLU → MaxPool → Linear(512→128)+ReLU → Linear.

    QuantStub/DeQuantStub mark where eager-mode quantization starts and ends.
    """

    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch `[N,1,16,16]`."""
        x = self.quant(x)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.dequant(self.fc2(x))


def build(out: Path) -> None:
    """Trains float, then QAT, exports and checks the ONNX model against torch."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    images, labels = load_images()
    train_idx, calib_idx, eval_idx = make_split(len(images))
    x = torch.from_numpy(images[train_idx]).unsqueeze(1)
    y = torch.from_numpy(labels[train_idx])
    model = DigitsQAT()
    train(model, x, y, EPOCHS, 1e-3, 32)
    model.train()
    fused = tq.fuse_modules_qat(
        model, [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]]
    )
    fused.qconfig = QCONFIG
    qat = tq.prepare_qat(fused)
    train(qat, x, y, QAT_EPOCHS, 2e-4, 32)
    qat.apply(tq.disable_observer)  # the ranges are trained; export them as they are
    qat.eval()

    folder = out / NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    example = torch.zeros(1, 1, IMG, IMG)
    torch.onnx.export(
        qat,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=OPSET,
        dynamo=False,
    )
    evals = images[eval_idx][:, None]
    write_samples(folder, images[calib_idx][:, None], evals, labels[eval_idx])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": evals})[0]
    with torch.no_grad():
        reference = qat(torch.from_numpy(evals)).numpy()
    accuracy = float((logits.argmax(1) == labels[eval_idx]).mean())
    torch_accuracy = float((reference.argmax(1) == labels[eval_idx]).mean())
    print(
        f"{NAME}: onnxruntime {accuracy:.1%}, torch {torch_accuracy:.1%}, "
        f"max |torch - onnxruntime| {np.abs(logits - reference).max():.2e}, "
        f"{path.stat().st_size:,} bytes"
    )


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and builds the model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_models"))
    args = parser.parse_args(argv)
    build(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
