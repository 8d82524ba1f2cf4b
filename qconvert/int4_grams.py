"""The layer inputs' Gram matrices for int4 rounding, a bounded group at a time.

GPTQ and the held-out judge need X^T X of each MatMul/Gemm input (`int4_rounding`): a
K x K float64 matrix on the fitting samples and one on the held-out ones, 16 K^2 bytes per
input whatever the number of samples. Held for every input at once, that is about 9 GB
for a 0.8B-parameter decoder (13 layers, four distinct inputs each, two of them 5,632
wide). `GroupedGrams` cuts the inputs, in the order the writer quantizes their weights,
into groups whose matrices fit `budget` bytes together (one input at least), and measures
a group with one float pass over the samples when one of its matrices is first asked
for, dropping the group before. One group means one pass, as before; each group more costs
one float pass more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from qconvert.budgeted_runs import runs_within
from qconvert.int4_rounding import Grams, split_counts

GRAM_BYTES = 512 << 20
"""The most bytes of Gram matrices (fit and held-out) measured in one float pass: the
bench decoder's 5,632-wide MLP input alone takes 508 MB, its 2,048-wide ones 67 MB each."""


def gram_bytes(k: int) -> int:
    """Bytes of one input's two float64 K x K matrices (fit and held-out)."""
    return 2 * k * k * 8


def gram_groups(widths: Mapping[str, int], budget: int) -> list[list[str]]:
    """The inputs of `widths` in order, cut into runs whose matrices fit `budget` together."""
    return runs_within(widths, lambda name: gram_bytes(widths[name]), budget)


class GroupedGrams:
    """`Grams`' reading side, measured a group of inputs at a time when first read.

    Args:
        measure: runs the float model over the samples and sums the Gram matrices of the
            inputs it is given (name -> K).
        widths: every input's K, in the order their weights are quantized.
        samples: the number of samples `measure` runs over (for the fit/held-out split).
        budget: the most bytes of matrices one group holds (one input at least).
    """

    def __init__(
        self,
        measure: Callable[[Mapping[str, int]], Grams],
        widths: Mapping[str, int],
        *,
        samples: int,
        budget: int = GRAM_BYTES,
    ) -> None:
        self._measure = measure
        self._widths = dict(widths)
        self.groups = gram_groups(self._widths, budget)
        self._group_of = {name: i for i, group in enumerate(self.groups) for name in group}
        self._index: int | None = None
        self._grams = Grams()
        self.fit_samples, self.held_samples = split_counts(samples)
        self.fit = _Side(self, "fit")
        self.held = _Side(self, "held")
        self.passes = 0
        self.peak_bytes = 0
        self.total_bytes = sum(gram_bytes(k) for k in self._widths.values())

    @property
    def names(self) -> tuple[str, ...]:
        """Every input, in the order their weights are quantized."""
        return tuple(self._widths)

    def matrices(self, name: str, side: str) -> dict[str, np.ndarray]:
        """The fit or held-out matrices of the group holding `name` (measured if need be)."""
        index = self._group_of.get(name)
        if index is not None and index != self._index:
            self._grams = Grams()  # drop the group before measuring the next
            self._index = index
            self._grams = self._measure({n: self._widths[n] for n in self.groups[index]})
            self.passes += 1
            held = sum(
                a.nbytes for a in (*self._grams.fit.values(), *self._grams.held.values())
            )
            self.peak_bytes = max(self.peak_bytes, held)
        return self._grams.fit if side == "fit" else self._grams.held


class _Side(Mapping[str, np.ndarray]):
    """The fit or held-out half of `GroupedGrams`, read like `Grams.fit` / `Grams.held`."""

    def __init__(self, owner: GroupedGrams, side: str) -> None:
        self._owner = owner
        self._side = side

    def __getitem__(self, name: str) -> np.ndarray:
        return self._owner.matrices(name, self._side)[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._owner.matrices(name, self._side)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner.names)

    def __len__(self) -> int:
        return len(self._owner.names)
