"""Graph passes on onnx_ir models: each one transformation, no I/O."""

from qconvert.passes.channels_last import FlattenChannelsLastPass
from qconvert.passes.cleanup import DropIntermediateShapesPass
from qconvert.passes.dynamic import DynamicQuantizePass
from qconvert.passes.fp16 import CastToFloat16Pass, StoreWeightsAsFloat16Pass
from qconvert.passes.opset_upgrade import UpgradeOpsetPass
from qconvert.passes.pad import FoldPadIntoReaderPass, PadOnIntegersPass
from qconvert.passes.prepare import FoldBatchNormPass, prepare
from qconvert.passes.qdq import InsertQDQPass
from qconvert.passes.qop import QDQToQOperatorPass
from qconvert.passes.recurrent import LstmOnIntegersPass
from qconvert.passes.resize import ResizeOnIntegersPass

__all__ = [
    "CastToFloat16Pass",
    "DropIntermediateShapesPass",
    "DynamicQuantizePass",
    "FlattenChannelsLastPass",
    "FoldBatchNormPass",
    "FoldPadIntoReaderPass",
    "InsertQDQPass",
    "LstmOnIntegersPass",
    "PadOnIntegersPass",
    "QDQToQOperatorPass",
    "ResizeOnIntegersPass",
    "StoreWeightsAsFloat16Pass",
    "UpgradeOpsetPass",
    "prepare",
]
