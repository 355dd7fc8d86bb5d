"""Hypothesis strategies and small helpers shared by the ``test_spec_*`` modules.

Cases are :class:`mlstm_spec.conformance.cases.Case` values: small, printable, and reproducible from
their seed (``Case(...).arrays()``), so a failing example can be pasted back as it is printed.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from mlstm_spec.conformance.cases import Case
from mlstm_spec.conformance.tolerances import relative_error

# Written from spec-facts.md / api-contract.md, not read from mlstm_spec, so the tests pin the code.
MODES = ("addition", "multiplicative_integration")
BIAS_OPTIONS = ("bias", "recurrent_bias", "multiplicative_bias")


@st.composite
def cases(draw, *, max_size=6, max_steps=6, dtype="float64", modes=MODES, independent=None,
          batched=None, weight_scales=(0.5, 1.0, 2.0)):
    """A drawn :class:`Case`: every size in 1..max_size, T in 1..max_steps, any option combination.

    ``independent`` / ``batched`` fix that option when not None.
    """
    if batched is None:
        batch = draw(st.none() | st.integers(1, max_size), label="batch")
    else:
        batch = draw(st.integers(1, max_size), label="batch") if batched else None
    return Case(
        batch=batch,
        steps=draw(st.integers(1, max_steps), label="steps"),
        input_size=draw(st.integers(1, max_size), label="input_size"),
        hidden_size=draw(st.integers(1, max_size), label="hidden_size"),
        dtype=dtype,
        integration_mode=draw(st.sampled_from(modes), label="integration_mode"),
        bias=draw(st.booleans(), label="bias"),
        recurrent_bias=draw(st.booleans(), label="recurrent_bias"),
        multiplicative_bias=draw(st.booleans(), label="multiplicative_bias"),
        independent_recurrence=(
            draw(st.booleans(), label="independent_recurrence") if independent is None else independent
        ),
        with_state=draw(st.booleans(), label="with_state"),
        with_d_state=draw(st.booleans(), label="with_d_state"),
        weight_scale=draw(st.sampled_from(weight_scales), label="weight_scale"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
    )


def assert_close(actual, expected, bound, what, case=None):
    """Fail with ``what[index]=a, but should be e`` when the norm-wise relative error exceeds bound."""
    __tracebackhide__ = True
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what} has shape {actual.shape}, but should be {expected.shape} [{case}]")
    error, at = relative_error(actual, expected)
    if not error <= bound:
        raise AssertionError(
            f"{what}{list(at)}={actual[at]!r}, but should be {expected[at]!r} "
            f"(relative error {error:.3g} > {bound:g}) [{case}]"
        )
    return error
