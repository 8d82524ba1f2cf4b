"""Planning: decide, per tensor, how it is quantized, as plain immutable data.

The planner walks the graph once in topological order and reads the op policy table
(`ops.py`), the scheme and the calibrated ranges. It returns a `QuantPlan`:

1. every activation to quantize, with its parameters (from its calibrated range);
2. every weight, with its per-channel axis and parameters (from its values);
3. every bias, as int32 at scale activation scale x weight scale;
4. every Relu/Clip whose clamp the output quantization already performs, to drop;
5. every node, quantized or float, with the reason.

`make_dynamic_plan` (int8-dynamic) plans weights only, and `make_float16_plan` (fp16,
fp16-weights) which nodes run in float16 or which initializers are stored as float16.
`--exclude`/`--include-only` (a `NodeSelection`) and an override file (`Overrides`) edit
the plan: a node they leave float says so in its reason.

The rewrite pass only applies the plan, and the report shows it, so a user can see why
each node is or is not quantized.
"""

from qconvert.plan.answer_head import HEAD_FLOAT_MAX_WEIGHTS
from qconvert.plan.common import check_overrides
from qconvert.plan.concat import MIXED_RANGE_RATIO
from qconvert.plan.decisions import (
    ClampFold,
    NodeDecision,
    QuantPlan,
    Role,
    ScaleFold,
    TensorDecision,
)
from qconvert.plan.dynamic import make_dynamic_plan
from qconvert.plan.float16 import make_float16_plan
from qconvert.plan.static import GELU_REASON, make_plan

__all__ = [
    "GELU_REASON",
    "HEAD_FLOAT_MAX_WEIGHTS",
    "MIXED_RANGE_RATIO",
    "ClampFold",
    "NodeDecision",
    "QuantPlan",
    "Role",
    "ScaleFold",
    "TensorDecision",
    "check_overrides",
    "make_dynamic_plan",
    "make_float16_plan",
    "make_plan",
]
