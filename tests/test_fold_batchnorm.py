"""`FoldBatchNormPass`: the folded weight is the float weight times gamma / sqrt(var + eps),
computed in float64 and rounded to float32 once."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qconvert import model as model_io
from qconvert import testing
from qconvert.passes.prepare import FoldBatchNormPass


def test_the_folded_conv_is_the_batchnorm_math_rounded_once():
    proto = testing.conv_bn_relu(channels=16)
    model = ir.serde.deserialize_model(proto)
    bn = next(node for node in model.graph if node.op_type == "BatchNormalization")
    conv = bn.inputs[0].producer()
    gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:5])
    weight = conv.inputs[1].const_value.numpy()
    old_bias = (
        conv.inputs[2].const_value.numpy().astype(np.float64)
        if len(conv.inputs) > 2 and conv.inputs[2] is not None
        else np.zeros_like(mean)
    )
    epsilon = bn.attributes.get_float("epsilon", 1e-5)
    factor = gamma / np.sqrt(var + epsilon)
    expected = (weight.astype(np.float64) * factor[:, None, None, None]).astype(np.float32)

    assert FoldBatchNormPass()(model).modified
    assert "BatchNormalization" not in {node.op_type for node in model.graph}
    folded = next(node for node in model.graph if node.op_type == "Conv")
    np.testing.assert_array_equal(folded.inputs[1].const_value.numpy(), expected)
    bias = folded.inputs[2].const_value.numpy()
    np.testing.assert_array_equal(bias, ((old_bias - mean) * factor + beta).astype(np.float32))

    feeds = testing.random_inputs(proto, seed=0)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]
    after = ort.InferenceSession(model_io.to_bytes(model)).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
