"""Tiny models built in code, and numeric assertions, for qconvert's tests and for users'.

Example::

    from qconvert import testing
    model = testing.conv_bn_relu()
    testing.save(model, tmp_path / "model.onnx")

The builders live by family (`audio`, `cnn`, `dense`, `transformer`, `recurrent`,
`control_flow`, `detectors`, `edge_cases`); writing to disk in `files`, checks on models
in `checks`, a quantize run of a built model in `runs`. Every name is re-exported here,
so `testing.NAME` is the one way to reach them.
"""

from __future__ import annotations

from qconvert.testing.audio import stft_front_end, tones
from qconvert.testing.checks import count_ops, optimized_model, optimized_ops, output_sqnr
from qconvert.testing.cnn import (
    conv_bn_relu,
    conv_relu_conv,
    pointwise_hardswish_depthwise,
    pointwise_two_depthwise,
    squeeze_excitation,
    thin_chain,
    upsample_add,
)
from qconvert.testing.control_flow import loop_matmul_relu, loop_matmul_scaled_sigmoid
from qconvert.testing.dense import (
    deep_residual_mlp,
    gemm_bias,
    matmul_add,
    sensitive_mlp,
    sequence_mlp,
    two_inputs,
)
from qconvert.testing.detectors import detector_head
from qconvert.testing.edge_cases import conv_and_matmul_outputs, integer_only
from qconvert.testing.files import random_inputs, save, save_with_external_data, write_samples
from qconvert.testing.recurrent import lstm, recurrent
from qconvert.testing.runs import quantize_fast
from qconvert.testing.transformer import (
    embedding_mlp,
    layernorm_matmul,
    matmul_layernorm_exp,
    tied_decoder,
)

__all__ = [
    "conv_and_matmul_outputs",
    "conv_bn_relu",
    "conv_relu_conv",
    "count_ops",
    "deep_residual_mlp",
    "detector_head",
    "embedding_mlp",
    "gemm_bias",
    "integer_only",
    "layernorm_matmul",
    "loop_matmul_relu",
    "loop_matmul_scaled_sigmoid",
    "lstm",
    "matmul_add",
    "matmul_layernorm_exp",
    "optimized_model",
    "optimized_ops",
    "output_sqnr",
    "pointwise_hardswish_depthwise",
    "pointwise_two_depthwise",
    "quantize_fast",
    "random_inputs",
    "recurrent",
    "save",
    "save_with_external_data",
    "sensitive_mlp",
    "sequence_mlp",
    "squeeze_excitation",
    "stft_front_end",
    "thin_chain",
    "tied_decoder",
    "tones",
    "two_inputs",
    "upsample_add",
    "write_samples",
]
