"""Logic every backend shares and that does not depend on the framework.

Constructor options, canonical-parameter stacks, and the checks of inputs given as shapes and dtype
names, so that each backend module holds only what is specific to its framework.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mlstm_spec.equations import BIAS_FLAGS
from mlstm_spec.validation import LayerInfo, check_integration_mode, check_sizes, check_stack

#: Keyword options every layer takes, with their defaults (the same as mlstm_spec.init_params).
LAYER_OPTIONS = dict(
    bias=True,
    recurrent_bias=True,
    multiplicative_bias=True,
    independent_recurrence=False,
    integration_mode="addition",
)


def check_layer_options(input_size, hidden_size, *, num_layers=1, dropout=0.0, integration_mode="addition",
                        **flags) -> None:
    """Validate a layer constructor's arguments (input_size may be None where it is inferred)."""
    if input_size is None:
        check_sizes(1, hidden_size)
    else:
        check_sizes(input_size, hidden_size)
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    check_integration_mode(integration_mode)
    for name, value in flags.items():
        if name not in LAYER_OPTIONS:
            raise TypeError(f"unexpected option {name!r}; the options are {sorted(LAYER_OPTIONS)}")
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def set_layer_options(layer, *, bias, recurrent_bias, multiplicative_bias, independent_recurrence,
                      integration_mode) -> None:
    """Store the (already checked) options on a layer object under their own names, plus
    ``multiplicative``: whether the gates use multiplicative integration."""
    layer.bias = bool(bias)
    layer.recurrent_bias = bool(recurrent_bias)
    layer.multiplicative_bias = bool(multiplicative_bias)
    layer.independent_recurrence = bool(independent_recurrence)
    layer.integration_mode = integration_mode
    layer.multiplicative = check_integration_mode(integration_mode)


def canonical_stack(params) -> tuple[list[dict], list[LayerInfo]]:
    """Normalise one canonical mapping or a list of them (a stack) into a list of NumPy mappings, and
    check it with :func:`mlstm_spec.validation.check_stack` (valid layers, one dtype and one set of
    options, each layer's input size equal to the previous hidden size)."""
    layers = [params] if isinstance(params, Mapping) else params
    if isinstance(layers, (list, tuple)):
        layers = [{k: np.asarray(v) for k, v in p.items()} if isinstance(p, Mapping) else p
                  for p in layers]
    return list(layers), check_stack(layers)


def present_params(info: LayerInfo) -> list[str]:
    """Canonical names present in a layer with these options, in canonical order."""
    names = ["weight_ih", "weight_hh", "weight_mh"]
    return names + [name for name, flag in BIAS_FLAGS.items() if getattr(info, flag)]
