"""onnxruntime's GPTQ and HQQ int4, the peers of `--scheme int4 --data`: run by
`bench.steps.ort_int4_torch` in the interpreter of the Quark environment (.venv-quark).

Both import torch (HQQ's half-quadratic solver is written in it; GPTQ's copy of
neural-compressor converts each calibration sample with `util.to_numpy`, which imports torch
first), and the bench's own environment does not install torch.

    .venv-quark/bin/python -m bench.int4_peer_step --algo gptq --model M --data D --output O

- gptq: `GPTQWeightOnlyQuantConfig` over the calibration samples, symmetric blocks of
  `--block-size` (the quantizer's group size), MatMulNBits `accuracy_level` 4 as the RTN row;
  its GPTQ path quantizes MatMul weights only.
- hqq: `HQQWeightOnlyQuantConfig`, data-free; asymmetric blocks with float zero points (its
  solver moves the zero point off the integer grid), MatMul only (it raises on Gather).
"""

from __future__ import annotations

import argparse
import sys
import time

ACCURACY_LEVEL = 4


def quantize(algo: str, model: str, data: str | None, output: str, block_size: int) -> float:
    """Quantizes `model` into `output`; returns the seconds the peer took."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    started = time.perf_counter()
    if algo == "gptq":
        from bench.quark_step import _reader

        config = GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_reader(model, data), op_types_to_quantize=("MatMul",)
        )
        quantizer = MatMulNBitsQuantizer(
            onnx.load(model),
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
            algo_config=config,
        )
    else:
        config = HQQWeightOnlyQuantConfig(
            block_size=block_size,
            bits=4,
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",),
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(model), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(output, use_external_data_format=False)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int4_peer_step")
    parser.add_argument("--algo", choices=("gptq", "hqq"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data")
    parser.add_argument("--output", required=True)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()
    seconds = quantize(args.algo, args.model, args.data, args.output, args.block_size)
    print(f"{args.algo} seconds {seconds:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
