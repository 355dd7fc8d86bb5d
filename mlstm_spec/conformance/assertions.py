"""The suite in one call from a project's own tests: :func:`assert_conforms`.

::

    from mlstm_spec.conformance import assert_conforms

    def test_my_port_conforms():
        assert_conforms(MyAdapter())          # every dtype the adapter offers, small and large tier

On failure it raises :class:`~.suite.ConformanceError` (an ``AssertionError``, so pytest reports a
failed test) whose message is the runner's plain-text report: the table, every distinct failure with
Python that reproduces it, and the diagnosis of which known mLSTM variant the adapter computes.
"""

from __future__ import annotations

import random

from .calls import DEFAULT_TIMEOUT
from .report import EXIT_FAIL, EXIT_PASS, Report, plain_text


def assert_conforms(adapter, dtypes=None, *, profile: str | None = None, max_examples: int | None = None,
                    seed: int | None = None, large=None, timeout: float | None = DEFAULT_TIMEOUT,
                    diagnosis: bool = True) -> Report:
    """Check ``adapter`` in each of ``dtypes`` (default: every dtype it offers) and raise
    :class:`~.suite.ConformanceError` with the full report if any check fails; return the report
    otherwise.

    ``profile``: a Hypothesis profile of :mod:`.profiles` (default: the active one, e.g. from
    ``--hypothesis-profile``); ``max_examples`` overrides its small-tier count; ``large``: the large
    tier (default: the profile's); ``seed``: the examples' seed (default: drawn, and printed in the
    report, unless the profile is derandomized); ``timeout``: seconds per adapter call.
    """
    __tracebackhide__ = True
    from hypothesis import settings as hypothesis_settings

    from .diagnosis import diagnose
    from .runner import suite_settings
    from .suite import adapter_dtypes, check

    profile = profile or hypothesis_settings.get_current_profile_name()
    settings = suite_settings(profile, max_examples)
    if seed is None and not settings.derandomize:
        seed = random.SystemRandom().randrange(2**32)
    results = []
    for dtype in dtypes or adapter_dtypes(adapter):
        results += check(adapter, dtype, settings=settings, seed=seed, large=large or profile, timeout=timeout)
    failed = any(r.status == "fail" for r in results)
    metadata = {"profile": profile, "seed": seed, "seed_source": "given" if seed is not None else "derandomized"}
    diagnoses = []
    if failed and diagnosis:
        found = diagnose(adapter, timeout=timeout)
        diagnoses.append({"implementation": adapter.name, "device": str(getattr(adapter, "device", "cpu")),
                          "dtype": "float64" if "float64" in adapter_dtypes(adapter) else "float32"}
                         | found.as_dict())
    report = Report(results, metadata, EXIT_FAIL if failed else EXIT_PASS, diagnoses)
    if failed:
        from .suite import ConformanceError

        check_name = next(r.check for r in results if r.status == "fail")
        raise ConformanceError(
            f"{adapter.name} does not conform to mlstm_spec"
            + (f" (seed {seed}: pass seed={seed} to rerun the same examples)" if seed is not None else "")
            + "\n\n" + plain_text(report), check_name)
    return report
