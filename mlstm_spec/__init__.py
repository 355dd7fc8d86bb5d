"""mlstm_spec: the NumPy reference of the Multiplicative LSTM (RecurrentLayers.jl formulation).

It imports no deep-learning framework; every backend is checked against it.
"""

from .equations import (
    BIAS_FLAGS, IH_BLOCKS, INTEGRATION_MODES, MH_BLOCKS, PARAM_SHAPES, PEEPHOLE_WEIGHTS, RUNTIME_DEFAULTS,
    VARIANT_FLAGS, VARIANT_PARAM_SHAPES, sigmoid,
)
from .layout import from_julia_sequence, to_batch_major, to_julia_sequence, to_time_major
from .params import WEIGHT_INITS, block, glorot_uniform, init_params, orthogonal
from .reference import backward, cell, forward
from .validation import LayerInfo, check_params, check_runtime_options, check_stack
from .io import WeightFile, WeightFileError, load, save  # safetensors is imported only when used

__version__ = "0.1.0"

__all__ = [
    "BIAS_FLAGS", "IH_BLOCKS", "INTEGRATION_MODES", "MH_BLOCKS", "PARAM_SHAPES", "WEIGHT_INITS",
    # the variants: projection, peepholes (parameters) and the run-time options
    "PEEPHOLE_WEIGHTS", "RUNTIME_DEFAULTS", "VARIANT_FLAGS", "VARIANT_PARAM_SHAPES", "check_runtime_options",
    "LayerInfo", "backward", "block", "cell", "check_params", "forward", "from_julia_sequence",
    "glorot_uniform", "init_params", "orthogonal", "sigmoid", "to_batch_major", "to_julia_sequence",
    "to_time_major", "__version__",
    # weight files (mlstm_spec.io; needs the `io` extra when called)
    "WeightFile", "WeightFileError", "check_stack", "load", "save",
]
