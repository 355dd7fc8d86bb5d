"""Hypothesis profiles, registered once for the runner and the tests alike.

- ``default``: the main job's quick run (``mlstm-conformance``): 12 small-tier examples per
  implementation, device and dtype, plus the large tier. A JIT backend compiles a program per drawn
  shape, so the count sets the run's length; 12 catches every planted defect in
  :mod:`.defects` on seeds 0-5 (so did 6 and 9), as 25 does (docs/conformance.md, "Cost").
- ``ci``: 25 examples, derandomised (the same examples every run, so CI is reproducible), no database.
- ``thorough``: many more examples, for a release or after touching the equations.

Choose with ``--profile`` (runner), ``--hypothesis-profile`` (pytest) or ``MLSTM_PROFILE``.
No profile has a deadline: the first example of a JIT backend includes its compile time.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = {"default": 12, "ci": 25, "thorough": 300}
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

settings.register_profile("default", max_examples=EXAMPLES["default"], **_COMMON)
settings.register_profile("ci", max_examples=EXAMPLES["ci"], derandomize=True, database=None,
                          print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=EXAMPLES["thorough"], **_COMMON)


def profile_from_environment() -> str:
    """``MLSTM_PROFILE`` if set, else ``ci`` when ``CI`` is set (as CI services do), else ``default``."""
    name = os.environ.get("MLSTM_PROFILE") or ("ci" if os.environ.get("CI") else "default")
    if name not in EXAMPLES:
        raise ValueError(f"MLSTM_PROFILE must be one of {sorted(EXAMPLES)}, got {name!r}")
    return name
