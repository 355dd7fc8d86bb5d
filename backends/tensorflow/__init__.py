"""The mLSTM for TensorFlow / Keras 3: :class:`MLSTMCell`, the layer :class:`MLSTM`, and the conformance
adapter; the equations are in docs/equations.md.

``MLSTMCell`` is a Keras RNN cell (one step), usable inside ``keras.layers.RNN`` like
``keras.layers.LSTMCell``. ``MLSTM`` is a layer used like ``keras.layers.LSTM``; by default it runs a
fused path (``recurrence.py``: the input projection of the whole sequence as one matrix product, the
recurrence as one graph loop with a hand-written backward pass) and falls back to the generic
``keras.layers.RNN`` loop over the cell only when the fused path cannot express the configuration.

Keras must run on the TensorFlow backend (``KERAS_BACKEND=tensorflow``); importing this package with
another Keras backend raises ImportError.

Files: ``layer.py`` (the cell and the layer), ``recurrence.py`` (the fused loop), ``adapter.py`` (devices
and the conformance adapter).
"""

import os
import sys

if "tensorflow" not in sys.modules:
    # TensorFlow's C++ start-up chatter (oneDNN, absl) buries users' output; a user's own setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "backends.tensorflow needs Keras on the TensorFlow backend, but Keras is running on "
        f"{keras.backend.backend()!r}; set the environment variable KERAS_BACKEND=tensorflow before "
        "Keras is first imported (or use backends.torch / backends.jax for those frameworks)"
    )

from .adapter import ConformanceAdapter, describe_device, devices, full_float32, tf_device, versions  # noqa: E402
from .layer import MLSTM, MLSTMCell  # noqa: E402

__all__ = ["MLSTM", "ConformanceAdapter", "MLSTMCell", "describe_device", "devices", "full_float32", "tf_device",
           "versions"]
