"""Graph passes on onnx_ir models: each one transformation, no I/O."""

from qconvert.passes.cleanup import DropIntermediateShapesPass
from qconvert.passes.prepare import FoldBatchNormPass, UpgradeOpsetPass, prepare
from qconvert.passes.qdq import InsertQDQPass

__all__ = [
    "DropIntermediateShapesPass",
    "FoldBatchNormPass", "InsertQDQPass", "UpgradeOpsetPass", "prepare"]
