"""The conformance suite: property-based checks of any mLSTM implementation against ``mlstm_spec``.

Shipped inside the package so that the ``mlstm-conformance`` runner, every backend's tests and other
projects' tests (:func:`assert_conforms`) use the same checks. Needs Hypothesis
(``pip install 'mlstm-spec[conformance]'``).
"""

from .cases import LARGE_SHAPES, Case, CaseArrays, Shape, reference_forward, reference_gradients, to_dtype
from .tolerances import DTYPES, SHARPNESS, TOLERANCES, case_tolerance, relative_error, tolerance

#: Why the suite cannot run here (Hypothesis missing), or None. Importing the package still works
#: without Hypothesis, so that ``mlstm-conformance`` can say what to install instead of a traceback.
MISSING_DEPENDENCY = None
_NEEDS_HYPOTHESIS = ("CHECKS", "CheckResult", "ConformanceError", "assert_conforms", "cases", "check",
                     "diagnose", "evaluate_case", "profiles", "reproduce", "VARIANTS")
try:
    from . import profiles  # registers the Hypothesis profiles
    from .assertions import assert_conforms
    from .diagnosis import VARIANTS, diagnose
    from .suite import CHECKS, CheckResult, ConformanceError, cases, check, evaluate_case, reproduce
except ModuleNotFoundError as exc:
    if exc.name != "hypothesis":
        raise
    MISSING_DEPENDENCY = (
        "the conformance suite needs Hypothesis, which is not installed; "
        "install it with: pip install 'mlstm-spec[conformance]'"
    )

    def __getattr__(name):
        if name in _NEEDS_HYPOTHESIS:
            raise ImportError(MISSING_DEPENDENCY)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CHECKS", "DTYPES", "LARGE_SHAPES", "SHARPNESS", "TOLERANCES", "VARIANTS", "Case", "CaseArrays",
    "CheckResult", "ConformanceError", "Shape", "assert_conforms", "case_tolerance", "cases", "check",
    "diagnose", "evaluate_case", "profiles", "reference_forward", "reference_gradients", "relative_error",
    "reproduce", "to_dtype", "tolerance",
]
