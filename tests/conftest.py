"""Test configuration: Hypothesis profile, framework noise, and which frameworks must be present.

- Profile: ``--hypothesis-profile NAME`` or ``MLSTM_PROFILE``; ``ci`` by default when ``CI`` is set.
- ``MLSTM_BACKENDS=torch,jax,tensorflow`` makes those frameworks required: a missing one is an error,
  not a skip. With ``CI`` set and ``MLSTM_BACKENDS`` unset, all three are required (CI installs all,
  so it never silently tests less). Otherwise a missing framework is skipped with its reason.
- ``MLSTM_REQUIRE_GPU=1`` makes the GPU checks required: no GPU is then an error, not a skip.
"""

import os

# Before any framework is imported (helpers import them lazily): quiet TensorFlow's C++ and oneDNN logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from hypothesis import settings  # noqa: E402

from mlstm_spec.conformance import profiles  # noqa: E402

settings.load_profile(profiles.profile_from_environment())
