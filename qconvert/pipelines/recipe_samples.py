"""Which samples the default recipe scores on, and whether it runs at all.

The recipe (`pipelines.recipe`) holds a quarter of the --data samples out of calibration
to score its trials on (or takes --eval's), spread evenly over the folder; with too few
samples it does not run and `--recipe fast`'s single pass is written instead.
"""

from __future__ import annotations

from qconvert.pipelines.state import QuantizeState
from qconvert.schemes import StaticScheme

HELD_OUT = 16
"""Samples held out of calibration to score on, at least: 16 tell plans 0.5 dB apart (the
SQNR of 16 images of a 224 CNN varies by about 0.2 dB from one draw of 16 to another) at
the cost of a third of a float pass over 48 calibration samples per trial."""

MAX_HELD_OUT = 64
"""Samples held out at most: a quarter of the folder is held out when that is more than
`HELD_OUT` (`held_out_count`), so a larger folder scores top-1 agreement in finer steps
(1.6 points a sample on 64, against 6.25 on 16) at the same share of its float work."""

MIN_CALIBRATION = 32
"""Samples left to calibrate on after holding out; with fewer, the recipe does not run
(`fast` is used, and the report says why). Holding 16 out of fewer than 48 would take a
third or more of the statistics the ranges come from, to score decisions of a few tenths
of a dB."""

MAX_EVAL = 64
"""The most `--eval` samples the recipe scores on (spread over the folder): each trial
runs them all."""


def held_out_count(count: int) -> int:
    """How many of `count` samples to hold out: a quarter, `HELD_OUT` to `MAX_HELD_OUT`."""
    return min(max(HELD_OUT, count // 4), MAX_HELD_OUT)


def held_out_indices(count: int, held: int = HELD_OUT) -> tuple[int, ...]:
    """`held` sample indices spread evenly over `count`, never the first.

    The first sample stays in calibration: it is the one the written model is verified on.
    Evenly spread rather than the last ones: folders are often sorted by class or source.
    """
    return tuple(int((i + 0.5) * count / held) for i in range(held))


def spread(count: int, wanted: int) -> tuple[int, ...]:
    """`wanted` indices spread evenly over `count` (all of them when fewer)."""
    if count <= wanted:
        return tuple(range(count))
    return tuple(int(i * count / wanted) for i in range(wanted))


def recipe_applies(state: QuantizeState) -> bool:
    """Whether the default recipe runs.

    It runs when asked for, for a static scheme calibrating on --data, with no technique
    chosen by hand (then the user's choices are the recipe).
    """
    options, config = state.request.recipe, state.config
    if options is None or options.name != "default":
        return False
    if not isinstance(state.scheme, StaticScheme) or state.calibration is not None:
        return False
    if state.source is None:
        return False
    by_hand = (
        config.equalize,
        config.bias_correction,
        config.adaround,
        config.smooth_quant is not None,
        state.mixed,
    )
    return not any(by_hand)


def split_samples(state: QuantizeState) -> QuantizeState:
    """Holds samples out of calibration to score on (or takes --eval's), see the module."""
    if state.evaluation is not None:
        indices = spread(len(state.evaluation), MAX_EVAL)
        return state.replace(held_out=state.evaluation.select(indices))
    count = len(state.source)
    if count < HELD_OUT + MIN_CALIBRATION:
        note = (
            f"Recipe fast (the single pass): {count} samples are too few to hold "
            f"{HELD_OUT} out for scoring and calibrate on {MIN_CALIBRATION}; give --eval "
            f"DIR or at least {HELD_OUT + MIN_CALIBRATION} --data samples for the default "
            "recipe."
        )
        return state.replace(notes=(*state.notes, note))
    indices = held_out_indices(count, held_out_count(count))
    return state.replace(
        held_out=state.source.select(indices),
        source=state.source.without(indices),
        held_out_indices=indices,
        all_samples=state.source,
    )
