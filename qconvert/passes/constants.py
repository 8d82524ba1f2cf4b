"""Constant nodes lifted to initializers, without onnx_ir's protocol check per tensor.

onnx_ir's `LiftConstantsToInitializersPass` checks each Constant's tensor against
`TensorProtocol`, a runtime-checkable protocol: an isinstance of it walks every member of
the protocol, about 60 us a Constant. A small text-orientation CNN holds 308 Constants, and
the check was a third of its preparation (0.021 of 0.06 s of CPU), which every
calibration pays before its first sample. A tensor attribute that a parsed model holds is
one of onnx_ir's own tensor classes: that is checked by its base class, and anything else
takes onnx_ir's own path.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir import _core
from onnx_ir.passes.common import LiftConstantsToInitializersPass


class LiftConstantsPass(LiftConstantsToInitializersPass):
    """`LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)`, faster."""

    def __init__(self) -> None:
        super().__init__(lift_all_constants=True, size_limit=0)

    def _constant_node_attribute_to_tensor(
        self, node, attr_name: str, attr_value: ir.Attr, initializer_name: str
    ) -> ir.TensorProtocol | None:
        value = attr_value.value
        if (
            attr_name == "value"
            and attr_value.type == ir.AttributeType.TENSOR
            and isinstance(value, _core.TensorBase)
        ):
            return value
        return super()._constant_node_attribute_to_tensor(
            node, attr_name, attr_value, initializer_name
        )
