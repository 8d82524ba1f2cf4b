"""Writing blocked weights: com.microsoft MatMulNBits / GatherBlockQuantized, or blocked QDQ.

The pass (`write.WriteBlockedWeightsPass`) applies an `Int4Plan`; the quantized values come
from `quantize`, a function of one `BlockedWeight` giving its `BlockQuantized` in (N, K)
layout (round-to-nearest or GPTQ, the pipeline's choice). Every new initializer is an
`ir.LazyTensor`: the values are computed when the model is serialized, tensor by tensor, so
a model with external data is quantized and written holding about two weights in memory at
a time: the one being written and the next one, quantized meanwhile on a second core
(`streaming.Lookahead`).

One writer per form, each in its own module:

1. qop, MatMul / Gemm: MatMulNBits (`nbits`).
2. qop, Gather: GatherBlockQuantized (`gather`).
3. qop, tied embeddings (`BlockedWeight.tied_to`): one packed table read by both the
   Gather and the output projection (`tied`).
4. qop with the int8 kernel, MatMul / Gemm: int8 weights onnxruntime rebuilds from 4-bit
   codes at load, read by DynamicQuantizeMatMul (`int8_kernel`).
5. qdq: a blocked DequantizeLinear in front of the weight (`qdq`).

What they share (the graph being written, lazy initializers, node replacement, 4-bit
packing) is in `common`.

With `input_scales` (node -> s, `awq`), the node's input is first multiplied by 1/s (a Mul
before it); its quantized weight then stands for diag(s) W.

Nodes keep their output names; float weights no node reads any more are removed.
"""

from __future__ import annotations

from qconvert.passes.int4.write import WriteBlockedWeightsPass

__all__ = ["WriteBlockedWeightsPass"]
