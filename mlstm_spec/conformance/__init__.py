"""The conformance suite: property-based checks of any mLSTM implementation against ``mlstm_spec``.

Shipped inside the package so that the ``mlstm-conformance`` runner and every backend's tests use the
same checks. Needs Hypothesis (``pip install 'mlstm-spec[conformance]'``).
"""

from .cases import Case, CaseArrays, reference_forward, reference_gradients, to_dtype
from .tolerances import DTYPES, TOLERANCES, relative_error, tolerance

#: Why the suite cannot run here (Hypothesis missing), or None. Importing the package still works
#: without Hypothesis, so that ``mlstm-conformance`` can say what to install instead of a traceback.
MISSING_DEPENDENCY = None
try:
    from . import profiles  # registers the Hypothesis profiles
    from .suite import CHECKS, CheckResult, ConformanceError, cases, check, check_case, reproduce
except ModuleNotFoundError as exc:
    if exc.name != "hypothesis":
        raise
    MISSING_DEPENDENCY = (
        "the conformance suite needs Hypothesis, which is not installed; "
        "install it with: pip install 'mlstm-spec[conformance]'"
    )

    def __getattr__(name):
        if name in ("CHECKS", "CheckResult", "ConformanceError", "cases", "check", "check_case",
                    "profiles", "reproduce"):
            raise ImportError(MISSING_DEPENDENCY)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CHECKS", "DTYPES", "TOLERANCES", "Case", "CaseArrays", "CheckResult", "ConformanceError",
    "cases", "check", "check_case", "profiles", "reference_forward", "reference_gradients",
    "relative_error", "reproduce", "to_dtype", "tolerance",
]
