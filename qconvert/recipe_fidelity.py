"""How the recipe decides: a candidate's held-out fidelity and the tests a step must pass.

`Fidelity` is what the held-out samples say of one candidate model (pooled and per-sample
SQNR, top-1 and frame agreement, a classifier's lean); its methods are the decisions (a
step kept by the sign test, or on balance; a raise refused for its lean), and the
constants below are their thresholds, each with the measurement that set it.
`verdict_detail` and `balance_detail` say in words why a step went either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qconvert.class_flips import ExpectedFlips
from qconvert.class_shift import ClassShift

if TYPE_CHECKING:
    from qconvert.recipe_result import RecipeOptions


MIN_GAIN_DB = 0.1
"""A step must raise the held-out SQNR by this much to be kept: what 16 samples resolve,
and less than any technique here changes a model by when it matters."""

MIN_RAISE_GAIN_DB = 0.5
"""A node must gain this much raised alone to be tried as a raise: what 16 held-out samples
tell apart (the on-balance steps' threshold, `pipelines.recipe.ON_BALANCE`). Each one
tried costs a scoring on top of the raises before it, and smaller raises did not reach the
eval sets: an inverted-residual CNN raised an Add for +0.3 dB held out and scored 20.3 dB
on eval before and after, while 7 other candidates of 0.1-0.4 dB were each scored again on
top of it: 7 of the raise phase's 28 scorings."""

SIGN_TEST_ALPHA = 0.025
"""A step must also raise the SQNR on so many held-out samples, one by one, that a step
changing nothing but noise would do so with a chance of at most 2.5% (a one-sided sign test,
the two-sided 5% one; `wins_needed`): 13 of 16 samples, 41 of 64. The pooled SQNR is a mean a
few samples can carry: on a small text-orientation classifier weight rounding gained 1.8 dB
held-out while helping only 9 of 16 samples, and won on only 28 of 64 eval samples. At 5% (12
of 16) a text-probability-map detector kept bias correction on 12 of 16 (+0.2 dB) and lost 0.6
dB on eval against the single pass."""


def frames_resolve(mine: float, theirs: float) -> bool:
    """Whether two counts of disagreeing frames differ by more than their counting noise.

    Each count is the sum of many rare flips, close to Poisson, so their difference
    spreads by about the square root of their sum: one standard deviation is the bar.
    On a CTC recognizer's 16 held-out lines (640 frames, 56 disagreeing) bias correction
    went to 53 frames (3 against a spread of 10.4) while the SQNR rose 14.1 -> 16.7 dB on
    14 of 16 lines; frames alone dropped it, and eval lost 45% -> 57% exact strings.
    Weight rounding (56 -> 72) and equalization (56 -> 74) are past the bar and stay
    dropped by their frames. Counts of 0 and 1 never resolve; 0 and 2 do.
    """
    return abs(mine - theirs) > math.sqrt(mine + theirs) + 1e-9


SHIFT_RATIO = 3.0
"""A raise is refused where it leaves a classifier output's class scores leaning beyond
noise: by a mean shift at least this many times the energy noise alone would leave in a
mean of as many rows (`class_shift.ClassShift.ratio`), and `SHIFT_GROWTH` times the lean
before it (`Fidelity.leans_more`). For two classes the ratio is the shift's t statistic
squared, t >= 1.73: a lean that noise gives 1 time in 10 on 16 rows. A raise wrongly
refused costs the dB it would have gained; a lean kept costs agreement on any data whose
class mix differs from the held-out samples', where neither SQNR nor the top-1 veto sees
it (`class_shift`)."""

SHIFT_GROWTH = 2.0
"""How many times a raise must multiply the lean's energy (3 dB) to be refused for it: a
model may lean before the raise phase (its bias correction leaves some), and a raise that
leaves that lean as it was is no cause. On a two-class text-orientation classifier the
raised squeeze-excitation Conv took the lean from 0.004 (0.5x noise) to 0.014 (4.0x noise,
3.6 times) and cost 7 of 64 eval rows; on a 1000-class CNN the best raise took it from
0.080 (2.0x) to 0.087 (3.2x, 1.09 times) and gained 1 eval row."""


def wins_needed(pairs: int) -> int:
    """The fewest of `pairs` untied samples a step must improve (`SIGN_TEST_ALPHA`).

    The smallest k with P(Binomial(pairs, 1/2) >= k) <= alpha; `pairs` + 1 (never) when
    even all of them would not be enough (fewer than 5 pairs).
    """
    tail = 0.0
    for k in range(pairs, -1, -1):
        tail += math.comb(pairs, k) / 2.0**pairs
        if tail > SIGN_TEST_ALPHA:
            return k + 1
    return 0


def can_still_hold(wins: int, losses: int, remaining: int) -> bool:
    """Whether `wins` and `losses` so far can still pass the sign test (`wins_needed`).

    `remaining` samples are to go: each split of them into wins and ties is tried (a tie
    lowers the wins needed too).
    """
    return any(
        wins + won >= wins_needed(wins + losses + won) for won in range(remaining, -1, -1)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Fidelity:
    """How close a candidate's outputs are to the float model's on the held-out samples."""

    sqnr_db: float
    """The worst output's SQNR."""
    top1_agreement: float | None
    """The lowest top-1 agreement over classifier-like outputs (None without them)."""
    top1_rows: int = 0
    """The rows that agreement was counted on (held-out samples x batch); 0 unknown."""
    per_sample_db: tuple[float, ...] = ()
    """Each held-out sample's SQNR (its worst output), in sample order; empty unknown."""
    frame_agreement: float | None = None
    """For outputs that are sequences of class distributions (`sequence_scores`): the
    share of their frames whose top-1 class agrees with the float model's (None
    without them). Where it is known it decides, not the SQNR: see `improves`."""
    frame_rows: int = 0
    """The frames that agreement was counted on."""
    per_sample_frames: tuple[int, ...] = ()
    """Each held-out sample's frames that disagree, in sample order; empty unknown."""
    class_shifts: tuple[ClassShift | None, ...] = ()
    """Each classifier-like output's mean shift of its class scores against the float
    model's (`class_shift`), in output order (None: not measurable); empty unknown."""
    expected_flips: tuple[ExpectedFlips | None, ...] = ()
    """Each classifier-like output's flips expected from its rows' margins and its margin
    error (`class_flips`), in output order (None: not measurable); empty unknown."""
    rest_sqnr_db: float | None = None
    """The worst SQNR of the outputs that are not classifier-like, where
    `expected_flips` is known (None: every output is classifier-like)."""

    def leans_more(self, other: Fidelity) -> bool:
        """Whether some classifier output leans toward some classes more than in `other`.

        Its mean shift beyond noise (`SHIFT_RATIO`) and `SHIFT_GROWTH` times `other`'s
        on that output. False when either side does not know its shifts.
        """
        if len(self.class_shifts) != len(other.class_shifts):
            return False
        return any(
            mine is not None
            and theirs is not None
            and mine.ratio >= SHIFT_RATIO
            and mine.energy >= SHIFT_GROWTH * theirs.energy
            for mine, theirs in zip(self.class_shifts, other.class_shifts, strict=True)
        )

    def lean_detail(self, other: Fidelity) -> str:
        """`class scores lean: shift 4.0x noise (was 0.5x)`, for a refused raise."""
        worst = max(
            (
                (mine, theirs)
                for mine, theirs in zip(self.class_shifts, other.class_shifts, strict=True)
                if mine is not None and theirs is not None
            ),
            key=lambda pair: pair[0].ratio,
            default=None,
        )
        if worst is None:
            return "class scores lean"
        mine, theirs = worst
        return (
            f"class scores lean: mean shift {mine.ratio:.1f}x noise (was {theirs.ratio:.1f}x)"
        )

    def improves(self, other: Fidelity, *, top1_floor: float = 0.0) -> bool:
        """Whether this is better than `other`: SQNR up on most samples, top-1 kept.

        SQNR must rise by `MIN_GAIN_DB` over all samples, and, where both know their
        samples' SQNRs, on enough of them one by one (`holds_on_samples`): a gain carried
        by a few samples is noise to unseen data. SQNR decides: it moves with every technique,
        where agreement on n rows moves in steps of 1/n (6 points on 16 samples). One
        flipped row is within what n rows resolve (near 90% agreement, the binomial
        spread on 16 rows is 7.5 points), so it does not veto a step that SQNR favours
        while agreement stays at or above `top1_floor`; two flipped rows do. Below the
        floor a flipped row does veto: agreement is then what the recipe must raise, and a
        step that keeps 13 of 16 samples' SQNR gains while losing a row is as likely to lose
        rows on unseen data (a text-orientation classifier: +2 dB, and 2 of 64 eval rows
        lost). A one-row slack per kept step can add up only while SQNR keeps rising by
        `MIN_GAIN_DB` a step.

        Where both know their frame agreement (sequences of class distributions) and
        their counts differ by more than counting noise (`scored_by_frames`), frames
        decide instead of SQNR: fewer frames must disagree over all samples, and on
        enough samples one by one (the same sign test). The SQNR of such an output
        barely moves with what changes its frames' classes (`sequence_scores`); but
        within the noise of the counts it is the only measure left that moves.
        """
        if not self.keeps_top1(other, top1_floor=top1_floor):
            return False
        if self.scored_by_frames(other):
            return self.pooled_better(other) and self.holds_on_samples(other)
        if math.isnan(self.sqnr_db):
            return False
        if math.isnan(other.sqnr_db):
            return True
        if not self.sqnr_db >= other.sqnr_db + MIN_GAIN_DB:
            return False
        return self.holds_on_samples(other)

    def scored_by_frames(self, other: Fidelity) -> bool:
        """Whether frames decide between this and `other`.

        Both must know their frame agreement, and the frames that disagree must differ by
        more than counting resolves (`frames_resolve`). Within that, the SQNR decides:
        the counts are then noise, and the SQNR still sees every frame's margin.
        """
        if self.frame_agreement is None or other.frame_agreement is None:
            return False
        mine, theirs = self.disagreeing_frames, other.disagreeing_frames
        if mine is None or theirs is None:
            return True  # counts unknown: their noise too
        return frames_resolve(mine, theirs)

    @property
    def disagreeing_frames(self) -> float | None:
        """How many held-out frames disagree with the float model (None unknown)."""
        if self.frame_agreement is None or not self.frame_rows:
            return None
        return (1.0 - self.frame_agreement) * self.frame_rows

    def pooled_better(self, other: Fidelity) -> bool:
        """Better over all samples together.

        Fewer frames disagree where both know them, else SQNR up by `MIN_GAIN_DB`.
        """
        if self.scored_by_frames(other):
            return self.frame_agreement > other.frame_agreement + 1e-12
        return self.sqnr_db >= other.sqnr_db + MIN_GAIN_DB

    def gain_db(self, other: Fidelity) -> float:
        """How much better than `other`, in dB.

        Of SQNR, or where frames decide, of the frames that disagree (10 log10 of their
        ratio: a third fewer is +1.8 dB).
        """
        if not self.scored_by_frames(other):
            return self.sqnr_db - other.sqnr_db
        mine, theirs = 1.0 - self.frame_agreement, 1.0 - other.frame_agreement
        if mine <= 0.0:
            return 0.0 if theirs <= 0.0 else math.inf
        if theirs <= 0.0:
            return -math.inf
        return 10.0 * math.log10(theirs / mine)

    def paired(self, other: Fidelity) -> list[tuple[float, float]]:
        """Each sample's score here and in `other`, higher better; empty unknown."""
        if self.scored_by_frames(other):
            mine = tuple(-float(n) for n in self.per_sample_frames)
            theirs = tuple(-float(n) for n in other.per_sample_frames)
        else:
            mine, theirs = self.per_sample_db, other.per_sample_db
        if not mine or len(mine) != len(theirs):
            return []
        return list(zip(mine, theirs, strict=True))

    def keeps_top1(self, other: Fidelity, *, top1_floor: float = 0.0) -> bool:
        """Whether top-1 agreement fell by one row at most, by none below `top1_floor`."""
        if self.top1_agreement is None or other.top1_agreement is None:
            return True
        slack = 0.0
        if self.top1_rows and self.top1_agreement >= top1_floor - 1e-9:
            slack = 1.0 / self.top1_rows
        return self.top1_agreement >= other.top1_agreement - slack - 1e-9

    def better_on_balance(
        self, other: Fidelity, *, top1_floor: float = 0.0, min_gain_db: float = 0.0
    ) -> bool:
        """Whether a step the held-out samples need not prove is no worse than `other`.

        Better over all samples (`pooled_better`, and by `min_gain_db` at least,
        `gain_db`), worse on no more samples than it is better on, still better on the
        per-sample mean without the sample it helps most, and top-1 agreement kept as
        `improves` keeps it. For steps that fit nothing to
        the samples (a rounding taken away) or that are nearly always right on average
        (bias correction, weight rounding: `pipelines.recipe.ON_BALANCE`): the sign test
        would drop gains too small for 16 samples to resolve, and the samples need only
        not say it is worse. Leaving the best sample out keeps what the sign test guards
        against out too: a pooled gain one sample carries while the others lose.
        """
        if not self.keeps_top1(other, top1_floor=top1_floor):
            return False
        if math.isnan(self.sqnr_db) or not self.pooled_better(other):
            return False
        if self.gain_db(other) < min_gain_db:
            return False
        pairs = self.paired(other)
        if not pairs:
            return True
        gains = sorted(a - b for a, b in pairs)
        if sum(gains[:-1]) <= 0.0:
            return False
        return sum(g > 0 for g in gains) >= sum(g < 0 for g in gains)

    def holds_on_samples(self, other: Fidelity) -> bool:
        """Whether this beats `other` on enough samples one by one (`wins_needed`).

        Paired: sample i against sample i, by SQNR or, where frames decide, by the frames
        that disagree. Ties (the same SQNR, both exact; as many frames) count for
        neither side. True when the samples are unknown on either side.
        """
        pairs = self.paired(other)
        if not pairs:
            return True
        wins = sum(1 for a, b in pairs if a > b)
        losses = sum(1 for a, b in pairs if a < b)
        return wins >= wins_needed(wins + losses)

    def wins_over(self, other: Fidelity) -> str:
        """`12/16 samples`: on how many samples this beats `other` ('' unknown)."""
        pairs = self.paired(other)
        if not pairs:
            return ""
        wins = sum(1 for a, b in pairs if a > b)
        return f"{wins}/{len(pairs)} samples"

    def untied(self, other: Fidelity) -> int:
        """On how many samples this and `other` differ (0 unknown)."""
        return sum(1 for a, b in self.paired(other) if a != b)

    @property
    def sequence_agreement(self) -> float | None:
        """The share of samples whose every frame agrees (None without frames).

        Without the samples' counts, known only when every frame agrees (1.0).
        """
        if self.frame_agreement is None:
            return None
        if not self.per_sample_frames:
            return 1.0 if self.frame_agreement == 1.0 else None
        whole = sum(1 for n in self.per_sample_frames if n == 0)
        return whole / len(self.per_sample_frames)

    @property
    def flip_rate(self) -> float | None:
        """The highest share of rows expected to flip, over the classifier-like outputs.

        None without such outputs, or where one's flips are not measurable.
        """
        if not self.expected_flips or any(flips is None for flips in self.expected_flips):
            return None
        return max(flips.rate for flips in self.expected_flips if flips is not None)

    def meets(self, options: RecipeOptions) -> bool:
        """Whether the floor holds.

        Where frames are scored, the floor is that of top-1 agreement, counted over
        whole sequences (every frame agreeing: what a decoded string needs), and the
        SQNR floor does not apply: it is not what such an output is scored by.

        Where classifier-like outputs' flips are known (`flip_rate`, `class_flips`), their
        floor is the agreement floor on the rows expected to flip, and the SQNR floor
        applies to the other outputs only (`rest_sqnr_db`). What decides a class is its
        margin against the error, not the error's energy: a 1000-class CNN at 20 dB whose
        held-out rows lie far from a tie expects 1e-6 flips on 16 rows, and a two-class
        classifier at 26 dB with 11 of 64 rows within 0.37 of a tie flipped 3. The rows
        counted flipping are not asked for as well: on 16 rows a count meets a 97% floor
        only at 16 of 16, a floor of 100%, where the expected count resolves fractions of
        a row, and it is the count's own mean given the margins.
        """
        rate = self.flip_rate
        if self.frame_agreement is not None:
            whole = self.sequence_agreement
            if whole is None or whole < options.min_top1_agreement - 1e-9:
                return False
        elif rate is not None:
            rest = self.rest_sqnr_db
            if rest is not None and not rest >= options.floor_sqnr_db:
                return False
            return rate <= 1.0 - options.min_top1_agreement + 1e-9
        elif not self.sqnr_db >= options.floor_sqnr_db:
            return False
        return self.top1_agreement is None or self.top1_agreement >= options.min_top1_agreement

    def describe(self) -> str:
        """`31.2 dB`, `31.2 dB, top-1 100%, expected flips 0.01 of 16`, ...

        or `11.4 dB, frames 93.8%, sequences 25%`.
        """
        text = f"{self.sqnr_db:.1f} dB"
        if self.top1_agreement is not None:
            text += f", top-1 {self.top1_agreement * 100:.0f}%"
        flips = max(
            (f for f in self.expected_flips if f is not None),
            key=lambda f: f.rate,
            default=None,
        )
        if flips is not None:
            text += f", expected flips {flips.flips:.2f} of {flips.rows}"
        if self.frame_agreement is not None:
            text += f", frames {self.frame_agreement * 100:.1f}%"
            whole = self.sequence_agreement
            if whole is not None:
                text += f", sequences {whole * 100:.0f}%"
        return text


def verdict_detail(after: Fidelity, before: Fidelity, *, top1_floor: float = 0.0) -> str:
    """Why a tried step was kept or dropped, when the samples one by one decided it.

    `gain within noise: better on 9/16 samples (13 needed)` for a step whose pooled SQNR
    rose enough but on too few samples; `better on 13/16 samples` for a kept one; `top-1
    down 1 of 16 rows, below the 97% floor` for one agreement vetoed.
    """
    if (
        after.top1_agreement is not None
        and before.top1_agreement is not None
        and after.top1_rows
        and not after.improves(before, top1_floor=top1_floor)
        and after.improves(before, top1_floor=0.0)
    ):
        return _top1_veto(after, before, top1_floor)
    wins = after.wins_over(before)
    if not wins:
        return ""
    needed = f"{wins_needed(after.untied(before))} needed"
    if not after.pooled_better(before):
        return f"better on {wins} ({needed})"
    if after.holds_on_samples(before):
        return f"better on {wins} ({needed})"
    return f"gain within noise: better on {wins} ({needed})"


def _top1_veto(after: Fidelity, before: Fidelity, top1_floor: float) -> str:
    """`top-1 down 1 of 16 rows, below the 97% floor`: why an agreement was vetoed."""
    lost = round((before.top1_agreement - after.top1_agreement) * after.top1_rows)
    floor = f"{top1_floor * 100:g}%"
    return f"top-1 down {lost} of {after.top1_rows} rows, below the {floor} floor"


def balance_detail(
    after: Fidelity, before: Fidelity, *, top1_floor: float = 0.0, min_gain_db: float = 0.0
) -> str:
    """What decided a step `Fidelity.better_on_balance` judges.

    `better on 6/16 samples, worse on 5`; `gain under 0.5 dB: better on 12/16 samples,
    worse on 4`; `gain within noise: ...` where the samples but the one it helps most
    lose; `top-1 down 1 of 16 rows, below the 97% floor` for one agreement vetoed.
    """
    if not after.keeps_top1(before, top1_floor=top1_floor) and after.keeps_top1(before):
        return _top1_veto(after, before, top1_floor)
    pairs = after.paired(before)
    if not pairs:
        return ""
    wins = sum(a > b for a, b in pairs)
    losses = sum(a < b for a, b in pairs)
    text = f"better on {wins}/{len(pairs)} samples, worse on {losses}"
    if not after.pooled_better(before) or not after.keeps_top1(before, top1_floor=top1_floor):
        return text
    if after.gain_db(before) < min_gain_db:
        return f"gain under {min_gain_db:g} dB: {text}"
    if not after.better_on_balance(before, top1_floor=top1_floor):
        return f"gain within noise: {text}"
    return text
