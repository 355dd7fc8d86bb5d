"""Test configuration: Hypothesis profile, framework noise, and which frameworks must be present.

- Profile: ``--hypothesis-profile NAME`` or ``MLSTM_PROFILE``; ``ci`` by default when ``CI`` is set.
- ``MLSTM_BACKENDS=torch,jax,tensorflow`` makes those frameworks required: a missing one is an error,
  not a skip. With ``CI`` set and ``MLSTM_BACKENDS`` unset, all three are required (CI installs all,
  so it never silently tests less). Otherwise a missing framework is skipped with its reason. A CI
  machine that lacks one on purpose (a GPU image without TensorFlow) names what it has instead:
  ``MLSTM_BACKENDS=torch,jax``.
- ``MLSTM_REQUIRE_GPU=1`` makes the GPU checks required: no GPU is then an error, not a skip. Every
  GPU case carries the ``gpu`` marker: ``pytest -m gpu`` runs just those.
"""

from mlstm_spec._env import set_framework_environment

# Before any framework is imported (helpers import them lazily): quiet TensorFlow's logs, and keep JAX
# and TensorFlow from claiming most of a GPU's memory (pytest-xdist workers share it).
set_framework_environment()

from hypothesis import settings  # noqa: E402

from mlstm_spec.conformance import profiles  # noqa: E402

settings.load_profile(profiles.profile_from_environment())
