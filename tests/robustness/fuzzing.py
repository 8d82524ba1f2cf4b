"""Hypothesis settings shared by the fuzz tests.

In `make test` the examples are derandomized: the same cases every run, so a green suite
stays green. `make fuzz` (QCONVERT_FUZZ_EXAMPLES set) draws fresh random cases, many more.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CAMPAIGN = "QCONVERT_FUZZ_EXAMPLES" in os.environ


def fuzz_settings(default_examples: int) -> settings:
    """Settings for one fuzz test: `default_examples` in the suite, else the campaign's."""
    return settings(
        max_examples=int(os.environ.get("QCONVERT_FUZZ_EXAMPLES", default_examples)),
        deadline=None,
        derandomize=not CAMPAIGN,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
