"""The recipe's range-method step: the ranges the plan does not use, and when to try them.

The default plan takes auto's per-tensor choice (minmax, or a clipping method where a
tensor's tails are rare). The step tries the other side: minmax everywhere where the plan
clips, or auto's clipping where it does not (only when scored on --eval samples).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from qconvert.calibration import derive_ranges
from qconvert.pipelines.stages import ranges_of
from qconvert.pipelines.state import QuantizeState
from qconvert.plan import Role

if TYPE_CHECKING:
    from qconvert.pipelines.recipe import RecipeStages


def ranges_refusal(state: QuantizeState, *, on_eval: bool) -> str | None:
    """Why the range method step is not tried, or None.

    Clipping is only added when scored on --eval: auto clips each tensor where the
    calibration folder's tails are rare, and samples held out of that same folder share
    those tails, so they favour it where unseen data does not. On a CTC text recognizer auto's
    clipping won on 12 of 16 held-out samples (+1.5 dB) and cost the eval set 1.5 dB
    and one string of 42. Removing clipping (minmax everywhere) is tried either way.
    """
    if state.range_method is None or state.range_method.name != "auto":
        name = state.range_method.name if state.range_method is not None else "none"
        return f"--method {name} was asked for"
    if _alternative_ranges(state) is None:
        return "auto's per-tensor choice is minmax for every activation"
    if not on_eval and not activation_clipping(state):
        return (
            "adding auto's clipping is scored only on --eval samples: samples held out "
            "of the --data folder share the tails it clips"
        )
    return None


def activation_clipping(state: QuantizeState) -> bool:
    """Whether the plan's ranges clip some activation (a method other than minmax)."""
    choices = state.range_choices
    return any(
        decision.role is Role.ACTIVATION and choices.get(name, "minmax") != "minmax"
        for name, decision in state.plan.tensors.items()
    )


def _alternative_ranges(state: QuantizeState):
    """The ranges the plan does not use: minmax if it clips, else auto's clipping."""
    if activation_clipping(state):
        method = dataclasses.replace(state.range_method, name="minmax")
        ranges = dict(derive_ranges(state.calibration.observers, method))
        return ranges, dict.fromkeys(state.range_choices, "minmax"), "minmax everywhere"
    ranges, choices = ranges_of(state.calibration, state.range_method)
    clipping = [name for name, method in choices.items() if method != "minmax"]
    if not clipping:
        return None
    return ranges, choices, f"auto's per-tensor choices ({len(clipping)} clipped)"


def other_ranges(state: QuantizeState, stages: RecipeStages) -> QuantizeState:
    """`state` planned on the ranges it does not use (`state` itself where there are none)."""
    other = _alternative_ranges(state)
    if other is None:
        return state
    ranges, choices, label = other
    plan = stages.plan_with(state, ranges, frozenset(), frozenset())
    note = f"Range method: the recipe kept {label}, better on held-out samples."
    plan = dataclasses.replace(plan, notes=(*plan.notes, note))
    return state.replace(plan=plan, ranges=ranges, range_choices=choices)
