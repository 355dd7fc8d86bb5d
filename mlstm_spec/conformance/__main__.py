"""``python -m mlstm_spec.conformance``: the same as the ``mlstm-conformance`` console script."""

import sys

from .runner import main

sys.exit(main())
