"""The conformance suite: property-based checks of any mLSTM implementation against ``mlstm_spec``.

Shipped inside the package so that the ``mlstm-conformance`` runner and every backend's tests use the
same checks. Needs Hypothesis (``pip install 'mlstm-spec[conformance]'``).
"""

from . import profiles  # registers the Hypothesis profiles
from .cases import Case, CaseArrays, reference_forward, reference_gradients, to_dtype
from .suite import CHECKS, CheckResult, ConformanceError, cases, check, check_case, reproduce
from .tolerances import DTYPES, TOLERANCES, relative_error, tolerance

__all__ = [
    "CHECKS", "DTYPES", "TOLERANCES", "Case", "CaseArrays", "CheckResult", "ConformanceError",
    "cases", "check", "check_case", "profiles", "reference_forward", "reference_gradients",
    "relative_error", "reproduce", "to_dtype", "tolerance",
]
