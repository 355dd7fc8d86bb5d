"""Adapters that go wrong in the ways docs/conformance.md shows the runner's reports for. From this
directory::

    mlstm-conformance --impl broken_adapters:TwoBugs --dtypes float64 --seed 0
    mlstm-conformance --impl broken_adapters:Hanging --dtypes float64 --timeout 5

Each is the NumPy spec (``SpecAdapter``) with something wrong; ``tests/test_runner.py`` runs them.
"""

from __future__ import annotations

import sys
import threading

from mlstm_spec.conformance.defects import SpecAdapter


class TwoBugs(SpecAdapter):
    """Two unrelated bugs: it refuses sequences of 3 steps or more, and scales its outputs by 1.5 when
    H >= 2. The report lists each with its own smallest failing example."""

    name = "two-bugs"
    dtypes = ("float64", "float32")

    def forward(self, params, xs, state, *, integration_mode):
        if xs.shape[-2] >= 3:
            raise ValueError("sequences longer than 2 steps are not supported")
        hs, final = super().forward(params, xs, state, integration_mode=integration_mode)
        return (hs * 1.5 if hs.shape[-1] >= 2 else hs), final


class Exiting(SpecAdapter):
    """Calls ``sys.exit(0)`` in ``forward``: a failure of this adapter, not the end of the run."""

    name = "exiting"
    dtypes = ("float64",)

    def forward(self, params, xs, state, *, integration_mode):
        sys.exit(0)


#: set it to let a hanging call return (the tests do, once the runner has given up on it)
RELEASE = threading.Event()


class Hanging(SpecAdapter):
    """Never returns from ``forward`` (until ``RELEASE`` is set): the runner gives up after
    ``--timeout`` seconds and calls it no more."""

    name = "hanging"
    dtypes = ("float64",)

    def forward(self, params, xs, state, *, integration_mode):
        RELEASE.wait()
        return super().forward(params, xs, state, integration_mode=integration_mode)
