r"""The JAX backend of the mLSTM: a functional core and pytree modules that pass through ``jit``,
``grad``, ``vmap`` and optax unchanged.

Each layer computes the step of docs/equations.md (RecurrentLayers.jl's ``MultiplicativeLSTMCell``;
:mod:`mlstm_spec.equations` is the reference) for each element of the input sequence; in a stack,
layer ``l > 0`` takes ``h_t`` of layer ``l - 1`` as its input.

Parameters of one layer (the canonical mapping shared with :mod:`mlstm_spec`; gate blocks are
contiguous row blocks, block k is rows ``k*H:(k+1)*H``):

=============  ===============  ====================================================================
name           shape            role
=============  ===============  ====================================================================
``weight_ih``  ``(5H, I)``      input projection, row blocks ``m, i, o, f, z``
``weight_hh``  ``(H, H)``       hidden state to the multiplicative factor; ``(H,)`` (element-wise)
                                under ``independent_recurrence=True``
``weight_mh``  ``(4H, H)``      multiplicative state to the gates, row blocks ``i, o, f, z``
``bias_ih``    ``(5H,)``        blocks ``m, i, o, f, z``; present when ``bias=True``
``bias_hh``    ``(H,)``         present when ``recurrent_bias=True``
``bias_mh``    ``(4H,)``        blocks ``i, o, f, z``; present when ``multiplicative_bias=True``
``weight_hr``  ``(P, H)``       projection of the output to P < H features (``proj_size=P``); then
                                ``weight_hh`` is ``(H, P)`` and ``h`` is P wide (``c`` stays H wide)
``weight_ci``  ``(H,)``         peepholes (``peepholes=True``): ``c_{t-1}`` into gates i and f,
``weight_cf``                   ``c_t`` into gate o
``weight_co``
=============  ===============  ====================================================================

The spec's run-time variants ``cell_clip``, ``proj_clip`` and ``forget_bias`` are keyword arguments of
:func:`mlstm`, :func:`mlstm_stack` and :func:`cell` and options of the modules; they are static (part of
the compiled program). Every variant is off by default, and then not even traced: the program is the
plain mLSTM's.

Shapes (``B`` batch, ``T`` steps, ``I`` input size, ``H`` hidden size, ``L`` number of layers):

=========================================  ====================  ===================================
call                                       inputs                returns
=========================================  ====================  ===================================
``mlstm(params, xs, state)``               ``xs (B, T, I)``,     ``hs (B, T, H)``,
                                           ``state (h0, c0)``    ``(h_T, c_T)`` each ``(B, H)``
                                           each ``(B, H)``
``cell(params, x, state)``                 ``x (B, I)``          ``h (B, H), (h, c)``
``MLSTM(...)(xs, state)``                  ``xs (B, T, I)``,     ``hs (B, T, H)``,
                                           ``(h_0, c_0)`` each   ``(h_n, c_n)`` each ``(L, B, H)``
                                           ``(L, B, H)``
=========================================  ====================  ===================================

With a projection, ``H`` reads ``P`` for ``h``, ``h0``, ``h_T``, ``h_n`` and ``hs`` (``c`` stays H wide).
Unbatched inputs drop the ``B`` axis everywhere (``xs (T, I)`` gives ``hs (T, H)``). ``state=None``
means zeros. ``MLSTM`` keeps a leading layer axis on its state even for one layer, as
``torch.nn.LSTM`` does; the functional ``mlstm`` and ``cell`` follow :func:`mlstm_spec.forward`.

Speed: the input projection of all T steps is one matrix product before the time loop, and the loop is
one ``lax.scan`` (``unroll`` steps per iteration), so compile time does not grow with T.

Precision: float32 and float64 compute in their own dtype. float16 and bfloat16 are storage formats:
parameters, inputs and results are in that dtype, but the computation runs in float32 and only its
results are rounded (as :mod:`mlstm_spec` does for float16), so they carry one rounding each; their
gradients likewise. (Rounding the operands of every step's matrix products to bfloat16 instead gave
gradient errors above 10% on three-step, two-layer cases of the conformance suite.) On a GPU, JAX's
default matmul precision may use TF32 for float32; wrap calls in
``jax.default_matmul_precision("highest")`` for full float32 products.

float64 needs JAX's 64-bit mode (``jax.config.update("jax_enable_x64", True)``): without it JAX
silently turns float64 into float32, so this module raises a ``TypeError`` instead whenever it sees
float64 values or is asked for a float64 dtype while the mode is off. (Under a ``jax.jit`` of your own,
JAX converts NumPy float64 arguments to float32 before this module sees them.) Importing this module
never changes JAX's configuration.

Input checks run at trace time (shapes and dtypes are static), so they cost nothing per call under
``jit``. Non-finite values are propagated, not checked (a check would force a device sync); a NaN in
one batch row does not reach the other rows.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlstm_spec.equations import PEEPHOLE_WEIGHTS, RUNTIME_DEFAULTS
from mlstm_spec.params import _check_proj_size, _initial_forget_bias
from mlstm_spec.validation import (
    LayerInfo, check_integration_mode, check_runtime_options, dtype_name, expected_shapes,
)

from ._common import (
    DTYPES,
    LAYER_OPTIONS,
    VARIANT_OPTIONS,
    AdapterBase,
    InputChecks,
    canonical_import,
    check_layer_options,
    init_layers,
    work_dtype,
)

__all__ = ["DTYPES", "MLSTM", "MLSTMCell", "EqxMLSTMCell", "ConformanceAdapter", "cell", "devices", "init", "mlstm",
           "mlstm_stack"]

CHECKS = InputChecks(is_array=lambda v: hasattr(v, "shape") and hasattr(v, "dtype"),
                     array_name="a JAX or NumPy array", backend="backends.jax", variants=VARIANT_OPTIONS)


# ---------------------------------------------------------------------------------------------------
# validation (trace time: only shapes and dtypes are read)
# ---------------------------------------------------------------------------------------------------

def _x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def _check_x64(dtype: str, argument: str) -> None:
    if dtype == "float64" and not _x64_enabled():
        raise TypeError(
            f"{argument} is float64, but JAX's 64-bit mode is off, so JAX would silently compute in "
            "float32; call jax.config.update('jax_enable_x64', True) first, or use float32"
        )


def _check_layer(params, argument: str = "params") -> LayerInfo:
    """Validate one canonical mapping of arrays (or tracers) and return what it describes."""
    info = CHECKS.params(params, argument)
    _check_x64(info.dtype, argument)
    return info


def _check_stack(layers, argument: str = "params") -> list[LayerInfo]:
    """Validate a list of canonical mappings of arrays (or tracers): see InputChecks.stack."""
    infos = CHECKS.stack(layers, argument)
    _check_x64(infos[0].dtype, argument)
    return infos



def _warn_meaning_changed(owner: str, forget_bias) -> None:
    """``forget_bias=`` on the JAX constructors set the initial forget block until 0.1.0; it is now the
    run-time constant, as in every other backend. Code written for the old meaning still runs, so it is
    told, for one release, rather than left to compute something else in silence."""
    if forget_bias:
        warnings.warn(
            f"{owner}(forget_bias={forget_bias!r}) adds {forget_bias!r} to the forget gate's pre-activation at "
            "every step (TensorFlow's meaning, as in every backend here). Before version 0.1.0 it set the "
            f"initial forget block of bias_ih; for that, pass forget_bias_init={forget_bias!r} instead. This "
            "warning is removed in the next release.", FutureWarning, stacklevel=3)

def _check_runtime(info: LayerInfo | None, cell_clip, proj_clip, forget_bias) -> dict:
    """The run-time variants as Python floats (``None`` / ``0.0`` when off), checked by the spec's rules:
    clips positive and finite, ``forget_bias`` finite, ``proj_clip`` only with a projection."""
    return check_runtime_options(info, cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias)


def _switched_on(runtime: dict) -> tuple:
    """The run-time variants that are on, as hashable ``(name, value)`` pairs (a static jit argument;
    empty without variants, so a variant-free call compiles and caches as it always did)."""
    return tuple((name, value) for name, value in runtime.items() if value not in (None, 0.0))


def _check_unroll(unroll) -> int:
    if isinstance(unroll, bool) or not isinstance(unroll, (int, np.integer)) or unroll < 1:
        raise ValueError(f"unroll must be an int >= 1 (steps per scan iteration), got {unroll!r}")
    return int(unroll)


def _check_dtype_option(dtype) -> str:
    try:
        name = dtype_name(jnp.dtype(dtype))
    except TypeError:
        raise TypeError(f"dtype must be one of {DTYPES}, got {dtype!r}") from None
    if name not in DTYPES:
        raise TypeError(f"dtype must be one of {DTYPES}, got {name}")
    _check_x64(name, "dtype")
    return name


# ---------------------------------------------------------------------------------------------------
# the computation (inside jit: no validation, only arrays)
# ---------------------------------------------------------------------------------------------------

def _compute_dtype(dtype):
    """float32 for half-precision inputs (see the module docstring), else the dtype itself."""
    return jnp.dtype(work_dtype(jnp.dtype(dtype).name))


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def _matmul_t(a, w):
    """``a @ w.T`` without materialising the transpose: a (..., K), w (N, K) -> (..., N)."""
    return lax.dot_general(a, w, (((a.ndim - 1,), (1,)), ((), ())))


def _clip(value, bound):
    """``value`` limited to ``[-bound, bound]``, with the spec's gradient: 1 on the closed interval, 0
    outside (``jnp.clip`` would give 1/2 at the bounds; NaN stays NaN)."""
    return jnp.where(value > bound, bound, jnp.where(value < -bound, -bound, value))


def _step(params, p, h, c, *, multiplicative, cell_clip=None, proj_clip=None, forget_bias=0.0):
    """One step from the input projection ``p`` (B, 5H) and the state ``h`` (B, P or H), ``c`` (B, H).
    The variants (mlstm_spec.equations) are traced only when switched on: without them this is the
    plain step, operation for operation."""
    hidden = c.shape[-1]
    peepholes = "weight_ci" in params
    w_hh = params["weight_hh"]
    r = h * w_hh if w_hh.ndim == 1 else _matmul_t(h, w_hh)
    if "bias_hh" in params:
        r = r + params["bias_hh"]
    m = p[..., :hidden] * r
    q = _matmul_t(m, params["weight_mh"])
    if "bias_mh" in params:
        q = q + params["bias_mh"]
    p_gates = p[..., hidden:]
    a = p_gates * q if multiplicative else p_gates + q
    if not (peepholes or forget_bias):
        ifo = jax.nn.sigmoid(a[..., : 3 * hidden])  # blocks i, o, f are contiguous
        i, o, f = ifo[..., :hidden], ifo[..., hidden : 2 * hidden], ifo[..., 2 * hidden :]
    else:
        a_i, a_f = a[..., :hidden], a[..., 2 * hidden : 3 * hidden]
        if peepholes:  # i and f see the previous cell state, o the new one (below)
            a_i, a_f = a_i + params["weight_ci"] * c, a_f + params["weight_cf"] * c
        if forget_bias:
            a_f = a_f + forget_bias
        i, f = jax.nn.sigmoid(a_i), jax.nn.sigmoid(a_f)
        o = None if peepholes else jax.nn.sigmoid(a[..., hidden : 2 * hidden])
    z = jnp.tanh(a[..., 3 * hidden :])
    c = f * c + i * z
    if cell_clip is not None:
        c = _clip(c, cell_clip)
    if peepholes:
        o = jax.nn.sigmoid(a[..., hidden : 2 * hidden] + params["weight_co"] * c)
    h = o * jnp.tanh(c)
    if "weight_hr" in params:
        h = _matmul_t(h, params["weight_hr"])
        if proj_clip is not None:
            h = _clip(h, proj_clip)
    return h, c


def _input_projection(params, xs):
    """``W_ih x_t + b_ih`` for all steps as one product, time-major: (B, T, I) -> (T, B, 5H)."""
    # Time-major input first: XLA:CPU runs this as one plain GEMM, while the einsum "bti,gi->tbg"
    # (transposing the result instead) measured 1.5-4x slower at the benchmark sizes.
    p = _matmul_t(jnp.swapaxes(xs, 0, 1), params["weight_ih"])
    if "bias_ih" in params:
        p = p + params["bias_ih"]
    return p


def _run_layer(params, xs, h0, c0, multiplicative, unroll, mask=None, reverse=False, runtime=()):
    """One layer over a batched sequence xs (B, T, I) from (h0, c0) (B, P or H; B, H): hs (B, T, P or H),
    (h, c). ``mask`` (B, T) bool: steps where it is False keep the state and output zeros. ``reverse``:
    the steps run from T - 1 down to 0; ``hs`` stays in input order. ``runtime``: the run-time variants
    switched on, as ``(name, value)`` pairs."""

    def body(carry, inputs):
        p_t, valid = inputs
        h, c = _step(params, p_t, *carry, multiplicative=multiplicative, **dict(runtime))
        if valid is None:
            return (h, c), h
        valid = valid[:, None]
        return (jnp.where(valid, h, carry[0]), jnp.where(valid, c, carry[1])), jnp.where(valid, h, 0)

    steps = (_input_projection(params, xs), None if mask is None else jnp.swapaxes(mask, 0, 1))
    (h, c), hs = lax.scan(body, (h0, c0), steps, unroll=unroll, reverse=reverse)
    return jnp.swapaxes(hs, 0, 1), (h, c)


@partial(jax.jit, static_argnames=("multiplicative", "unroll", "layer_axis", "reverse", "runtime"))
def _forward_jit(layers, xs, state, multiplicative, unroll, layer_axis, mask=None, reverse=False, runtime=()):
    """A stack over xs (B, T, I) or (T, I); state None or (h0, c0) each (L, [B,] H), or ([B,] H)
    for one layer without ``layer_axis`` (and the final state alike; h is P wide with a projection);
    mask None or ([B,] T) bool; ``runtime`` the run-time variants switched on, ``(name, value)`` pairs."""
    dtype = xs.dtype
    work = _compute_dtype(dtype)
    layers, xs, state = _cast((layers, xs, state), work)
    if state is not None and not layer_axis:
        state = (state[0][None], state[1][None])
    batched = xs.ndim == 3
    if not batched:
        xs = xs[None]
        mask = None if mask is None else mask[None]
        if state is not None:
            state = (state[0][:, None], state[1][:, None])
    batch, hidden = xs.shape[0], layers[0]["weight_hh"].shape[0]
    finals_h, finals_c = [], []
    out = xs
    for layer, params in enumerate(layers):
        if state is None:
            # Built from xs so that it carries xs's sharding type: under jax.shard_map a constant zero
            # carry is "invariant" while the scan's output carry is "varying", and lax.scan refuses that.
            h0 = c0 = lax.full_like(xs, 0, work, (batch, hidden))
            if "weight_hr" in params:
                h0 = lax.full_like(xs, 0, work, (batch, params["weight_hr"].shape[0]))
        else:
            h0, c0 = state[0][layer], state[1][layer]
        out, (h, c) = _run_layer(params, out, h0, c0, multiplicative, unroll, mask, reverse, runtime)
        finals_h.append(h)
        finals_c.append(c)
    h_n, c_n = jnp.stack(finals_h), jnp.stack(finals_c)
    if not batched:
        out, h_n, c_n = out[0], h_n[:, 0], c_n[:, 0]
    if not layer_axis:
        h_n, c_n = h_n[0], c_n[0]
    return _cast((out, (h_n, c_n)), dtype)


def _padding_mask(xs, mask, seq_lengths):
    """The (B, T) or (T,) bool mask from ``mask`` or ``seq_lengths`` (checked; at most one given)."""
    if mask is not None and seq_lengths is not None:
        raise ValueError("give mask or seq_lengths, not both (seq_lengths=n means mask[b, t] = t < n[b])")
    shape = CHECKS.shape_of(xs)
    if mask is not None:
        CHECKS.array(mask, "mask")
        if CHECKS.shape_of(mask) != shape[:-1]:
            raise ValueError(f"mask must have the shape of xs without its feature axis, {shape[:-1]}, got "
                             f"{CHECKS.shape_of(mask)}")
        if jnp.dtype(mask.dtype) != jnp.bool_:
            raise TypeError(f"mask must be a bool array (True: a real step), got dtype {mask.dtype}")
        return mask
    if seq_lengths is not None:
        CHECKS.array(seq_lengths, "seq_lengths")
        if CHECKS.shape_of(seq_lengths) != shape[:-2]:
            raise ValueError(f"seq_lengths must have shape {shape[:-2]} (one length per sequence), got "
                             f"{CHECKS.shape_of(seq_lengths)}")
        if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
            raise TypeError(f"seq_lengths must be an integer array, got dtype {seq_lengths.dtype}")
        return jnp.arange(shape[-2]) < jnp.asarray(seq_lengths)[..., None]
    return None


# ---------------------------------------------------------------------------------------------------
# the functional API
# ---------------------------------------------------------------------------------------------------

def mlstm(params, xs, state=None, *, integration_mode="addition", unroll=1, mask=None, seq_lengths=None,
          reverse=False, cell_clip=None, proj_clip=None, forget_bias=0.0):
    """Run one mLSTM layer over a sequence; the signature and results of :func:`mlstm_spec.forward`.

    Args:
        params: canonical mapping of JAX (or NumPy) arrays, see the module docstring.
        xs: inputs, ``(B, T, I)`` batch-major or ``(T, I)`` unbatched, in the parameters' dtype.
        state: ``(h0, c0)``, each ``(B, H)`` or ``(H,)``; ``None`` means zeros (also under
            ``jax.shard_map``).
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``.
        unroll: steps per ``lax.scan`` iteration (trades compile time for speed).
        mask: ``(B, T)`` (or ``(T,)``) bool, True at real steps. A masked step keeps the state as it is
            and outputs zeros, so a padded sequence gives the final state of its real steps.
        seq_lengths: ``(B,)`` (or ``()``) integers, instead of ``mask``: steps ``t < seq_lengths[b]`` are
            real (right padding). Lengths above T count as T, below 0 as 0.
        reverse: run the steps from last to first (the backward half of a bidirectional layer);
            ``hs`` stays in input order, and with padding each sequence starts at its last real step.
        cell_clip, proj_clip, forget_bias: the spec's run-time variants (static: each value compiles
            its own program): ``None`` or a bound > 0 for ``c`` and for the projected ``h`` (needs
            ``weight_hr``), and a constant added to the forget gate's pre-activation (``0.0``: off).

    With a projection (``weight_hr`` (P, H) in ``params``), ``h`` and ``hs`` are P wide and ``c`` H wide;
    peepholes are read from ``weight_ci``, ``weight_cf``, ``weight_co``.

    Returns:
        ``hs, (h_T, c_T)``: ``hs`` is ``(B, T, H)`` or ``(T, H)``; the final state like ``state``.

    Raises:
        ValueError, TypeError: at trace time, for shapes, dtypes or parameter sets that do not fit.
    """
    multiplicative = check_integration_mode(integration_mode)
    unroll = _check_unroll(unroll)
    info = _check_layer(params)
    runtime = _switched_on(_check_runtime(info, cell_clip, proj_clip, forget_bias))
    batched = CHECKS.sequence(xs, info)
    if state is not None:
        CHECKS.state(state, CHECKS.shape_of(xs)[:1] if batched else (), info)
        state = tuple(state)
    mask = _padding_mask(xs, mask, seq_lengths)
    return _forward_jit([dict(params)], xs, state, multiplicative, unroll, layer_axis=False, mask=mask,
                        reverse=bool(reverse), runtime=runtime)


def mlstm_stack(layers, xs, state=None, *, integration_mode="addition", unroll=1, mask=None, seq_lengths=None,
                reverse=False, cell_clip=None, proj_clip=None, forget_bias=0.0):
    """Run a stack of layers (a list of canonical mappings, first layer first) over a sequence.

    ``state`` is ``(h_0, c_0)``, each ``(L, B, H)`` (or ``(L, H)`` unbatched; h ``(L, B, P)`` with a
    projection), or ``None`` for zeros; returns ``hs, (h_n, c_n)`` with the final state of every layer
    in the same layout. ``mask``, ``seq_lengths``, ``reverse`` and the run-time variants as for
    :func:`mlstm`, applied to every layer.
    """
    multiplicative = check_integration_mode(integration_mode)
    unroll = _check_unroll(unroll)
    infos = _check_stack(layers)
    runtime = _switched_on(_check_runtime(infos[0], cell_clip, proj_clip, forget_bias))
    batched = CHECKS.sequence(xs, infos[0])
    if state is not None:
        batch_shape = (len(infos),) + (CHECKS.shape_of(xs)[:1] if batched else ())
        CHECKS.state(state, batch_shape, infos[0])
        state = tuple(state)
    mask = _padding_mask(xs, mask, seq_lengths)
    return _forward_jit([dict(p) for p in layers], xs, state, multiplicative, unroll, layer_axis=True, mask=mask,
                        reverse=bool(reverse), runtime=runtime)


def cell(params, x, state=None, *, integration_mode="addition", cell_clip=None, proj_clip=None, forget_bias=0.0):
    """One step, like :func:`mlstm_spec.cell`: ``x`` ``(B, I)`` or ``(I,)``, ``state`` ``(h, c)``
    each ``(B, H)`` or ``(H,)`` (h ``(B, P)`` or ``(P,)`` with a projection; ``None``: zeros). Returns
    ``h, (h, c)``. The run-time variants as for :func:`mlstm`."""
    multiplicative = check_integration_mode(integration_mode)
    info = _check_layer(params)
    runtime = _switched_on(_check_runtime(info, cell_clip, proj_clip, forget_bias))
    CHECKS.array(x, "x")
    shape = CHECKS.shape_of(x)
    if len(shape) not in (1, 2):
        raise ValueError(f"x must have shape (B, I) or (I,), got {len(shape)} dimensions {shape}")
    CHECKS.sequence(x, info, "x", shape=shape[:-1] + (1,) + shape[-1:])  # one step
    batch_shape = shape[:-1]
    if state is not None:
        CHECKS.state(state, batch_shape, info)
    return _cell_jit(dict(params), x, state, multiplicative, runtime)


@partial(jax.jit, static_argnames=("multiplicative", "runtime"))
def _cell_jit(params, x, state, multiplicative, runtime=()):
    dtype = x.dtype
    work = _compute_dtype(dtype)
    params, x, state = _cast((params, x, state), work)
    if state is None:
        state = (lax.full_like(x, 0, work, x.shape[:-1] + params["weight_hh"].shape[:1]),) * 2  # see _forward_jit
        if "weight_hr" in params:
            state = (lax.full_like(x, 0, work, x.shape[:-1] + params["weight_hr"].shape[:1]), state[1])
    p = _matmul_t(x, params["weight_ih"])
    if "bias_ih" in params:
        p = p + params["bias_ih"]
    h, c = _cast(_step(params, p, *state, multiplicative=multiplicative, **dict(runtime)), dtype)
    return h, (h, c)


# ---------------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------------

def _check_key(key):
    if not hasattr(key, "shape") or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and len(key.shape) == 1)
    ):
        raise TypeError(
            "key must be a JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {type(key).__name__}{getattr(key, 'shape', '')}"
        )


def init(key, input_size, hidden_size, *, dtype=jnp.float32, bias=True, recurrent_bias=True,
         multiplicative_bias=True, independent_recurrence=False, weight_init="glorot_uniform", proj_size=0,
         peepholes=False, unit_forget_bias=False, forget_bias_init=0.0, **renamed) -> dict:
    """Draw one layer's canonical parameters, as :func:`mlstm_spec.init_params` draws them (its
    options, under its names: ``proj_size`` adds ``weight_hr``, ``peepholes`` the peephole weights,
    ``unit_forget_bias`` / ``forget_bias_init`` set the initial forget block of ``bias_ih``), from a
    NumPy generator seeded by ``key``: the same key gives the same values. Values are drawn in float64
    and rounded to ``dtype``. ``key`` may be traced (``jax.jit(init)``, Flax's ``model.init`` under
    ``jit``): the draw then runs on the host through ``jax.pure_callback``, with the same values."""
    if renamed:
        _refuse_renamed(renamed, "init")
    _check_key(key)
    dtype = _check_dtype_option(dtype)
    flags = dict(bias=bias, recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias,
                 independent_recurrence=independent_recurrence)
    check_layer_options(input_size, hidden_size, **flags)
    # the spec's checks of the variants, run now rather than in the host callback of a traced key
    _check_proj_size(proj_size, hidden_size, independent_recurrence)
    _initial_forget_bias(unit_forget_bias, forget_bias_init, bias)
    structure = dict(proj_size=int(proj_size), peepholes=bool(peepholes))
    forget = dict(unit_forget_bias=bool(unit_forget_bias), forget_bias_init=forget_bias_init)

    def draw(bits):
        (params,) = init_layers(input_size, hidden_size, rng=np.random.default_rng(np.asarray(bits).ravel()),
                                dtype=dtype, weight_init=weight_init, **structure, **forget, **flags)
        return params

    bits = jax.random.key_data(key)
    if isinstance(bits, jax.core.Tracer):
        shapes = _layer_shapes(input_size, hidden_size, **structure, **flags)
        return jax.pure_callback(draw, {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
                                        for name, shape in shapes.items()}, bits)
    return {name: jnp.asarray(value) for name, value in draw(bits).items()}


def _refuse_renamed(options: dict, owner: str) -> None:
    if "forget_bias" in options:
        raise TypeError(
            f"{owner}(forget_bias=...) is now called forget_bias_init (the initial forget block of bias_ih, "
            "mlstm_spec.init_params's name); forget_bias is the run-time constant of mlstm, cell and the "
            "modules")
    raise TypeError(f"{owner}() got unexpected keyword argument(s) {sorted(options)}")


def _layer_shapes(input_size, hidden_size, *, bias, recurrent_bias, multiplicative_bias,
                  independent_recurrence, proj_size=0, peepholes=False) -> dict:
    """The canonical parameters' shapes of one layer with these options, in canonical order."""
    shapes = expected_shapes(input_size, hidden_size, independent_recurrence, proj_size)
    present = {"weight_ih": True, "weight_hh": True, "weight_mh": True, "bias_ih": bias,
               "bias_hh": recurrent_bias, "bias_mh": multiplicative_bias, "weight_hr": bool(proj_size),
               **{name: peepholes for name in PEEPHOLE_WEIGHTS}}
    return {name: shapes[name] for name, on in present.items() if on}


def _default_key(key):
    return jax.random.key(0) if key is None else key


# ---------------------------------------------------------------------------------------------------
# modules (pytrees: the parameter mappings are the leaves, the options are static)
# ---------------------------------------------------------------------------------------------------

def _from_canonical(params, options: dict, one_layer=False, owner="MLSTM"):
    """Canonical parameters (any backend's arrays, or a weight file) -> JAX arrays of the same dtype,
    exactly, the options (see backends._common.canonical_import) and the run-time variants they switch
    on (checked; a weight file's, or given)."""
    layers, infos, options = canonical_import(params, options, one_layer=one_layer, owner=owner,
                                              backend="backends.jax", variants=VARIANT_OPTIONS)
    _check_x64(infos[0].dtype, "params")
    for name in ("proj_size", "peepholes"):  # the options omit them when off: a given one must still agree
        value = getattr(infos[0], name)
        if name in options and options[name] != value:
            raise ValueError(f"{name}={options[name]!r} contradicts params, which imply {name}={value!r} "
                             "(read from the keys present and the shape of weight_hr)")
    runtime = _check_runtime(infos[0], *(options.get(name, default) for name, default in RUNTIME_DEFAULTS.items()))
    return [{name: jnp.asarray(value) for name, value in p.items()} for p in layers], options, runtime


def _unknown_options(options: dict, allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}; the options are {sorted(allowed)}")


def _runtime_options(module) -> dict:
    """A module's run-time variants, as keyword arguments of :func:`mlstm` and :func:`cell`."""
    return {name: getattr(module, name) for name in RUNTIME_DEFAULTS}


def _runtime_repr(module) -> str:
    """The run-time variants a module has switched on, for its repr."""
    return "".join(f", {name}={getattr(module, name)!r}" for name, default in RUNTIME_DEFAULTS.items()
                   if getattr(module, name) != default)


@jax.tree_util.register_pytree_node_class
class MLSTMCell:
    r"""One mLSTM step as a JAX pytree: ``cell(x, state=None) -> h, (h, c)``.

    Args:
        input_size: the number of features ``I`` of ``x``.
        hidden_size: the number of features ``H`` of the cell state (and of ``h`` without a projection).
        bias, recurrent_bias, multiplicative_bias: whether ``bias_ih``, ``bias_hh``, ``bias_mh`` exist.
        independent_recurrence: ``weight_hh`` is a vector ``(H,)`` applied element-wise.
        integration_mode: ``"addition"`` or ``"multiplicative_integration"`` (static).
        weight_init, proj_size, peepholes, unit_forget_bias, forget_bias_init: the initial parameters,
            as for :func:`init` (``proj_size=P`` makes ``h`` P wide).
        cell_clip, proj_clip, forget_bias: the run-time variants of :func:`mlstm` (static).
        key: a ``jax.random`` key for the initial weights (``None``: ``jax.random.key(0)``).
        dtype: the parameters' dtype (float64 needs JAX's 64-bit mode).

    Inputs: ``x`` ``(B, I)`` or ``(I,)``; ``state`` ``(h, c)`` each ``(B, H)`` or ``(H,)`` (h P wide
    with a projection), or None.

    Attributes:
        params: the canonical mapping of JAX arrays (the pytree's leaves); ``weight_ih`` ``(5H, I)``
            with row blocks ``m, i, o, f, z``, ``weight_hh`` ``(H, H)``, ``(H,)`` or ``(H, P)``,
            ``weight_mh`` ``(4H, H)`` with row blocks ``i, o, f, z``, and the biases, ``weight_hr``
            ``(P, H)`` and the peephole weights ``(H,)`` that are switched on.
    """

    def __init__(self, input_size, hidden_size, *, bias=True, recurrent_bias=True, multiplicative_bias=True,
                 independent_recurrence=False, integration_mode="addition", weight_init="glorot_uniform",
                 proj_size=0, peepholes=False, unit_forget_bias=False, forget_bias_init=0.0, cell_clip=None,
                 proj_clip=None, forget_bias=0.0, key=None, dtype=jnp.float32):
        check_layer_options(input_size, hidden_size, integration_mode=integration_mode)
        _warn_meaning_changed(type(self).__name__, forget_bias)
        params = init(_default_key(key), input_size, hidden_size, dtype=dtype, bias=bias,
                      recurrent_bias=recurrent_bias, multiplicative_bias=multiplicative_bias,
                      independent_recurrence=independent_recurrence, weight_init=weight_init, proj_size=proj_size,
                      peepholes=peepholes, unit_forget_bias=unit_forget_bias, forget_bias_init=forget_bias_init)
        runtime = _check_runtime(CHECKS.params(params), cell_clip, proj_clip, forget_bias)
        self._set(params, integration_mode, **runtime)

    def __call__(self, x, state=None):
        return cell(self.params, x, state, integration_mode=self.integration_mode, **_runtime_options(self))

    @classmethod
    def from_canonical(cls, params, **options):
        """Build from one canonical mapping (any backend's arrays, or what :func:`mlstm_spec.load`
        returns), copying values and dtype exactly. Options as for :meth:`MLSTM.from_canonical`."""
        _unknown_options(options, [*LAYER_OPTIONS, *VARIANT_OPTIONS])
        (layer,), options, runtime = _from_canonical(params, options, one_layer=True, owner="MLSTMCell")
        check_integration_mode(options.get("integration_mode", "addition"))
        return cls._build(layer, options.get("integration_mode", "addition"), *runtime.values())

    def to_canonical(self) -> list[dict]:
        """``[mapping]``: the parameters as NumPy arrays (a one-layer list, like ``MLSTM``)."""
        return [{name: np.asarray(value) for name, value in self.params.items()}]

    def _set(self, params, integration_mode, cell_clip=None, proj_clip=None, forget_bias=0.0):
        self.params, self.integration_mode = params, integration_mode
        self.cell_clip, self.proj_clip, self.forget_bias = cell_clip, proj_clip, forget_bias

    @classmethod
    def _build(cls, params, *static):
        obj = object.__new__(cls)
        obj._set(params, *static)
        return obj

    def tree_flatten(self):
        return (self.params,), (self.integration_mode, self.cell_clip, self.proj_clip, self.forget_bias)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls._build(children[0], *aux)

    def __repr__(self):
        w_ih = self.params["weight_ih"]
        return (f"{type(self).__name__}(input_size={w_ih.shape[1]}, hidden_size={w_ih.shape[0] // 5}, "
                f"params={sorted(self.params)}, integration_mode={self.integration_mode!r}"
                f"{_runtime_repr(self)}, dtype={w_ih.dtype})")


@jax.tree_util.register_pytree_node_class
class EqxMLSTMCell(MLSTMCell):
    """:class:`MLSTMCell` with the calling convention of ``equinox.nn.LSTMCell``:
    ``(h, c) = cell(x, (h, c), key=None)``, so a scan written for an Equinox LSTM cell takes it
    unchanged. ``x`` is ``(I,)`` (vmap over a batch, as Equinox does) or ``(B, I)``; ``key`` is unused (no
    dropout). Same constructor, ``from_canonical`` and pytree leaves as :class:`MLSTMCell`, so it can be a
    field of an ``equinox.Module``. (:class:`MLSTMCell` keeps its ``h, (h, c)`` result.)"""

    def __call__(self, x, state, *, key=None):
        return cell(self.params, x, state, integration_mode=self.integration_mode, **_runtime_options(self))[1]


@jax.tree_util.register_pytree_node_class
class MLSTM:
    r"""A stack of mLSTM layers over a sequence, as a JAX pytree:
    ``model(xs, state=None) -> hs, (h_n, c_n)``.

    The parameters (one canonical mapping per layer, in ``model.layers``) are the pytree's leaves, and
    the options (``integration_mode``, ``unroll`` and the run-time variants) its static part, so a model
    passes through ``jax.jit``, ``jax.grad``, ``jax.vmap`` and optax as it is. The equations, parameter
    table and precision rules are in the module docstring.

    Args:
        input_size: the number of features ``I`` of the input.
        hidden_size: the number of features ``H`` of every layer's cell state (and of ``h`` without a
            projection).
        num_layers: the number of stacked layers ``L`` (layer l > 0 reads layer l - 1's outputs).
        bias, recurrent_bias, multiplicative_bias: whether ``bias_ih``, ``bias_hh``, ``bias_mh`` exist.
        independent_recurrence: ``weight_hh`` is a vector ``(H,)`` applied element-wise.
        integration_mode: ``"addition"`` (default) or ``"multiplicative_integration"``.
        unroll: steps per ``lax.scan`` iteration; more can be faster at the price of compile time.
        weight_init, proj_size, peepholes, unit_forget_bias, forget_bias_init: the initial parameters,
            as for :func:`init` (``proj_size=P``: every layer's ``h`` is P wide, and layer l > 0 reads P
            features).
        cell_clip, proj_clip, forget_bias: the run-time variants of :func:`mlstm`, for every layer.
        key: a ``jax.random`` key for the initial weights (``None``: ``jax.random.key(0)``); layer l
            draws from ``jax.random.split(key, L)[l]``.
        dtype: the parameters' dtype (float64 needs JAX's 64-bit mode).

    Inputs: ``xs, (h_0, c_0)``
        - ``xs``: ``(B, T, I)`` batch-major, or ``(T, I)`` unbatched, in the parameters' dtype.
        - ``h_0``, ``c_0``: ``(L, B, H)`` (or ``(L, H)`` unbatched; ``h_0`` P wide with a projection);
          ``None`` means zeros.

    Outputs: ``hs, (h_n, c_n)``
        - ``hs``: ``(B, T, H)`` (or ``(T, H)``; P wide with a projection): the last layer's ``h_t``.
        - ``h_n``, ``c_n``: ``(L, B, H)`` (or ``(L, H)``; ``h_n`` P wide): every layer's final state.

    Attributes:
        layers: list of canonical mappings of JAX arrays, first layer first: ``weight_ih``
            ``(5H, I)`` (``(5H, H)`` or ``(5H, P)`` for l > 0), row blocks ``m, i, o, f, z``;
            ``weight_hh`` ``(H, H)``, ``(H,)`` or ``(H, P)``; ``weight_mh`` ``(4H, H)``, row blocks
            ``i, o, f, z``; and the biases, ``weight_hr`` and peephole weights that are switched on.
    """

    def __init__(self, input_size, hidden_size, *, num_layers=1, bias=True, recurrent_bias=True,
                 multiplicative_bias=True, independent_recurrence=False, integration_mode="addition",
                 unroll=1, weight_init="glorot_uniform", proj_size=0, peepholes=False, unit_forget_bias=False,
                 forget_bias_init=0.0, cell_clip=None, proj_clip=None, forget_bias=0.0, key=None,
                 dtype=jnp.float32):
        _warn_meaning_changed(type(self).__name__, forget_bias)
        check_layer_options(input_size, hidden_size, num_layers=num_layers, integration_mode=integration_mode)
        unroll = _check_unroll(unroll)
        keys = jax.random.split(_default_key(key), num_layers)
        options = dict(dtype=dtype, bias=bias, recurrent_bias=recurrent_bias,
                       multiplicative_bias=multiplicative_bias, independent_recurrence=independent_recurrence,
                       weight_init=weight_init, proj_size=proj_size, peepholes=peepholes,
                       unit_forget_bias=unit_forget_bias, forget_bias_init=forget_bias_init)
        output_size = proj_size or hidden_size
        layers = [init(keys[layer], input_size if layer == 0 else output_size, hidden_size, **options)
                  for layer in range(num_layers)]
        runtime = _check_runtime(CHECKS.params(layers[0]), cell_clip, proj_clip, forget_bias)
        self._set(layers, integration_mode, unroll, **runtime)

    def __call__(self, xs, state=None):
        return mlstm_stack(self.layers, xs, state, integration_mode=self.integration_mode, unroll=self.unroll,
                           **_runtime_options(self))

    @classmethod
    def from_canonical(cls, params, *, unroll=1, **options):
        """Build from one canonical mapping, a list of them (a stack), or what :func:`mlstm_spec.load`
        returns (whose options are used), copying values and dtype exactly; the values may be any
        backend's arrays. The bias options, ``independent_recurrence``, ``proj_size``, ``peepholes`` and
        ``num_layers`` may be given but must agree with the parameters; ``cell_clip``, ``proj_clip``
        and ``forget_bias`` are the run-time variants (a weight file's own must not be contradicted)."""
        unroll = _check_unroll(unroll)
        _unknown_options(options, [*LAYER_OPTIONS, "num_layers", *VARIANT_OPTIONS])
        layers, options, runtime = _from_canonical(params, options)
        integration_mode = options.get("integration_mode", "addition")
        check_integration_mode(integration_mode)
        return cls._build(layers, integration_mode, unroll, *runtime.values())

    def to_canonical(self) -> list[dict]:
        """One mapping of NumPy arrays per layer, first layer first (bfloat16 as ml_dtypes.bfloat16)."""
        return [{name: np.asarray(value) for name, value in layer.items()} for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def input_size(self) -> int:
        return self.layers[0]["weight_ih"].shape[1]

    @property
    def hidden_size(self) -> int:
        return self.layers[0]["weight_ih"].shape[0] // 5

    @property
    def proj_size(self) -> int:
        """P, the width of ``h`` (0 without a projection)."""
        return self.layers[0]["weight_hr"].shape[0] if "weight_hr" in self.layers[0] else 0

    def _set(self, layers, integration_mode, unroll, cell_clip=None, proj_clip=None, forget_bias=0.0):
        self.layers, self.integration_mode, self.unroll = layers, integration_mode, unroll
        self.cell_clip, self.proj_clip, self.forget_bias = cell_clip, proj_clip, forget_bias

    @classmethod
    def _build(cls, layers, *static):
        obj = object.__new__(cls)
        obj._set(layers, *static)
        return obj

    def tree_flatten(self):
        return (self.layers,), (self.integration_mode, self.unroll, self.cell_clip, self.proj_clip, self.forget_bias)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls._build(children[0], *aux)

    def __repr__(self):
        first = self.layers[0]
        return (f"MLSTM(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, params={sorted(first)}, "
                f"integration_mode={self.integration_mode!r}, unroll={self.unroll}{_runtime_repr(self)}, "
                f"dtype={first['weight_ih'].dtype})")


def _stack_in_param_dtype(layers, xs, state, **options):
    """:func:`mlstm_stack` with ``xs`` and ``state`` cast to the parameters' dtype first, as Flax's
    layers promote their inputs (the linen and nnx stacks call it)."""
    dtype = layers[0]["weight_ih"].dtype
    if state is not None:
        state = (state[0].astype(dtype), state[1].astype(dtype))
    return mlstm_stack(layers, xs.astype(dtype), state, **options)


def _cell_in_param_dtype(params, carry, x, **options):
    """One step of :func:`cell` on a Flax-style carry ``(c, h)``, cast to the parameters' dtype first:
    returns ``(c, h), h`` (the linen and nnx cells call it)."""
    dtype = params["weight_ih"].dtype
    c, h = carry
    h, (h, c) = cell(params, x.astype(dtype), (h.astype(dtype), c.astype(dtype)), **options)
    return (c, h), h


# ---------------------------------------------------------------------------------------------------
# devices and the conformance adapter
# ---------------------------------------------------------------------------------------------------

def devices() -> list[str]:
    """``"cpu"`` and every accelerator JAX sees, as ``"<platform>:<id>"`` (e.g. ``"gpu:0"``)."""
    names = ["cpu"]
    for device in jax.devices():
        if device.platform != "cpu":
            names.append(f"{device.platform}:{device.id}")
    return names


def describe_device(device: str) -> str:
    """The accelerator's kind (e.g. its GPU model); the device name otherwise."""
    found = _jax_device(device)
    return device if found.platform == "cpu" else found.device_kind


def versions() -> dict:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def _jax_device(name: str):
    platform, _, index = str(name).partition(":")
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, IndexError, ValueError):
        raise ValueError(f"device must be one of {devices()}, got {name!r}") from None


#: Compiled programs one adapter keeps before starting afresh. Each XLA:CPU executable holds about 70
#: memory mappings until it is freed, and Linux allows a process 65530 by default; a long conformance
#: run (hundreds of drawn shapes per dtype) would otherwise exhaust them.
_MAX_PROGRAMS = 128


def _adapter_programs() -> dict:
    """Fresh jitted programs (new function objects, so dropping them frees their compiled
    executables): ``forward``, and ``pullback``, which returns the outputs and the cotangents of
    ``(model, xs, state)`` for given output cotangents, as ``jax.vjp`` computes them."""

    def forward(model, xs, state):
        return model(xs, state)

    def pullback(model, xs, state, cotangents):
        outputs, vjp = jax.vjp(forward, model, xs, state)
        # Flat leaves: the program's result names then do not spell the model's pytree, so the jax,
        # flax and flax_nnx adapters lower the same program for the same case and share its compilation.
        return outputs, jax.tree.leaves(vjp(cotangents))

    return {"forward": jax.jit(forward), "pullback": jax.jit(pullback)}


def _share_compilations() -> None:
    """Turn on JAX's persistent compilation cache, in a temporary directory removed at exit, unless the
    process has set its own. The JAX-based adapters (jax, flax, flax_nnx) lower the same programs for
    the same cases, so each is compiled once per run instead of once per adapter; compiling, not
    computing, is most of a JAX conformance row's time."""
    if jax.config.jax_compilation_cache_dir:
        return
    directory = tempfile.mkdtemp(prefix="mlstm-jax-programs-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class ConformanceAdapter(AdapterBase):
    """The conformance suite's adapter for this backend (on :class:`backends._common.AdapterBase`).

    It builds the model with :meth:`MLSTM.from_canonical`, computes with jitted functions whose
    compilations JAX reuses across calls of the same shapes and options (a bounded number of them,
    see ``_MAX_PROGRAMS``), and takes gradients with ``jax.vjp``. Constructing it turns on JAX's
    64-bit mode (``jax_enable_x64``) for the whole process: the suite checks float64, which JAX only
    computes with that mode on. On an accelerator every call runs under
    ``jax.default_matmul_precision("highest")`` so that float32 means float32 (no TF32).
    """

    name = "jax"
    variants = frozenset(VARIANT_OPTIONS)

    def __init__(self, device: str = "cpu"):
        jax.config.update("jax_enable_x64", True)
        _share_compilations()
        super().__init__(device)
        self._device = _jax_device(self.device)
        self._programs, self._signatures = self._new_programs(), set()

    def _new_programs(self) -> dict:
        """Fresh jitted ``forward`` and ``pullback`` (a subclass for another model kind overrides it)."""
        return _adapter_programs()

    def _run(self, program: str, *args):
        """Call a jitted program; JAX reuses its compilation for a signature seen before. After
        ``_MAX_PROGRAMS`` distinct signatures the programs start afresh, freeing the old ones."""
        leaves, structure = jax.tree.flatten(args)
        signature = (program, structure, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
        if signature not in self._signatures:
            if len(self._signatures) >= _MAX_PROGRAMS:
                self._programs, self._signatures = self._new_programs(), set()
            self._signatures.add(signature)
        result = self._programs[program](*args)
        if program == "pullback":  # the outputs, and the cotangents of (model, xs, state) as flat leaves
            result = result[0], jax.tree.unflatten(jax.tree.structure(args[:3]), result[1])
        return result

    def precision(self):
        if self._device.platform == "cpu":
            return contextlib.nullcontext()
        return jax.default_matmul_precision("highest")

    def _put(self, tree):
        return jax.device_put(tree, self._device)

    def build(self, layers, integration_mode, **runtime):
        return self._put(MLSTM.from_canonical(layers, integration_mode=integration_mode, **runtime))

    def run(self, model, xs, state):
        xs, state = self._put(jnp.asarray(xs)), self._put(state)
        if state is None:  # the layer's own zero state: only the forward program takes it
            hs, (h_n, c_n) = self._run("forward", model, xs, state)
        else:
            # The outputs of the program gradients() then calls with the same signature (given zero
            # cotangents here): one compilation per case instead of two. They are the outputs of the
            # same traced forward; compiling, not computing, is most of a JAX conformance row's time.
            zeros = jax.tree.map(lambda out: jnp.zeros(out.shape, out.dtype),
                                 jax.eval_shape(self._programs["forward"], model, xs, state))
            (hs, (h_n, c_n)), _ = self._run("pullback", model, xs, state, self._put(zeros))
        return np.asarray(hs), np.asarray(h_n), np.asarray(c_n)

    def pullback(self, model, xs, state, d_hs, d_state):
        cotangents = self._put((jnp.asarray(d_hs), d_state))
        _, (d_model, d_xs, (d_h0, d_c0)) = self._run("pullback", model, self._put(jnp.asarray(xs)),
                                                     self._put(state), cotangents)
        grads = [{name: np.asarray(value) for name, value in layer.items()} for layer in d_model.layers]
        return grads, np.asarray(d_xs), np.asarray(d_h0), np.asarray(d_c0)
