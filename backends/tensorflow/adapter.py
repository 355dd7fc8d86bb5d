"""Devices, and the conformance adapter of the Keras backend (on :class:`backends._common.AdapterBase`)."""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf
import keras

from backends._common import VARIANT_OPTIONS, AdapterBase

from .layer import MLSTM


def devices() -> list[str]:
    """Devices TensorFlow sees: ``["cpu"]`` plus ``"gpu:K"`` for every visible GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    return ["cpu"] + [f"gpu:{k}" for k in range(len(gpus))]


def tf_device(device: str) -> str:
    """``"cpu"`` -> ``"/CPU:0"``, ``"gpu:1"`` -> ``"/GPU:1"``."""
    kind, _, index = str(device).lower().partition(":")
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu:K' (see devices()), got {device!r}")
    return f"/{kind.upper()}:{index or 0}"


def describe_device(device: str) -> str:
    """The GPU's model for a GPU; the device name otherwise."""
    kind, _, index = str(device).lower().partition(":")
    if kind == "gpu":
        gpus = tf.config.list_physical_devices("GPU")
        return tf.config.experimental.get_device_details(gpus[int(index or 0)]).get("device_name", device)
    return device


def versions() -> dict:
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


@contextlib.contextmanager
def full_float32():
    """Within the block float32 matrix products are float32 (no TensorFloat-32); restored afterwards."""
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)


class ConformanceAdapter(AdapterBase):
    """The :mod:`mlstm_spec.conformance` adapter: the public layer, NumPy in and out, each call under
    :func:`full_float32`.

    Builds the layer through :meth:`MLSTM.from_canonical` on every call (the compiled fused function is
    cached across calls by configuration), in the parameters' dtype: float16 and bfloat16 layers hold
    their variables in that dtype and compute in float32 (Keras's mixed-precision policies, whose
    variables are float32, are checked by the backend's own tests). Results are what the layer returns.
    Unbatched (T, I) inputs get a batch axis of one, because Keras layers take batched input only.
    Stacks are not supported (a Keras ``MLSTM`` is one layer). Every variant of the spec is computed:
    the run-time ones become the layer's constructor arguments of the same names.
    """

    name = "tensorflow"
    max_layers = 1
    batched_only = True
    variants = frozenset(VARIANT_OPTIONS)

    def __init__(self, device: str = "cpu", *, use_fused="auto", jit_compile=False):
        super().__init__(device)
        self._tf_device = tf_device(device)
        self.use_fused, self.jit_compile = use_fused, jit_compile

    def precision(self):
        return full_float32()

    def build(self, layers, integration_mode, **runtime):
        with tf.device(self._tf_device):
            return MLSTM.from_canonical(layers[0], integration_mode=integration_mode, return_sequences=True,
                                        return_state=True, use_fused=self.use_fused, jit_compile=self.jit_compile,
                                        **runtime)

    def run(self, model, xs, state):
        with tf.device(self._tf_device):
            initial = None if state is None else [tf.constant(s[0]) for s in state]
            hs, h, c = model(tf.constant(xs), initial_state=initial)
        return hs.numpy(), h.numpy()[None], c.numpy()[None]

    def pullback(self, model, xs, state, d_hs, d_state):
        with tf.device(self._tf_device):
            x, h0, c0 = (tf.constant(a) for a in (xs, state[0][0], state[1][0]))
            with tf.GradientTape() as tape:
                tape.watch([x, h0, c0])
                hs, h, c = model(x, initial_state=[h0, c0])
                # the loss is linear in the outputs, so its gradient is exactly (d_hs, d_h_T, d_c_T); it is
                # summed in float32 at least so that float16 cannot overflow
                wide = tf.float64 if hs.dtype == tf.float64 else tf.float32
                loss = sum(tf.reduce_sum(tf.cast(out, wide) * tf.constant(np.asarray(d, wide.as_numpy_dtype)))
                           for out, d in ((hs, d_hs), (h, d_state[0][0]), (c, d_state[1][0])))
            names = model.cell.param_names
            grads = tape.gradient(loss, [getattr(model.cell, n) for n in names] + [x, h0, c0])
        values = [g.numpy() for g in grads]
        return [dict(zip(names, values))], values[-3], values[-2][None], values[-1][None]
