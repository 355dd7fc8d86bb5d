"""The fused recurrence of the Keras layer: the input projection of the whole sequence as one matrix
product, then one graph loop over the steps, with a hand-written backward pass where no mask is given
(one for the variant-free layer, one for the spec's variants)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import tensorflow as tf

# ---------------------------------------------------------------------------------------------------
# The equations on tensors, all in one dtype (see backends._common.work_dtype). ``w_hh_t`` and ``w_mh_t``
# are the transposes of the canonical matrices, made once outside the loop (so a step is
# ``h @ w_hh_t``): on CPU a small product with a transposed operand (``transpose_b=True``) runs about
# 2.5x slower. A vector ``w_hh`` is independent recurrence. The input projection arrives as two
# tensors, ``p_m`` (block m, H wide) and ``p_g`` (blocks i, o, f, z, 4H wide), and gate blocks are
# taken with equal ``tf.split``s: no slice needs H as a number, so one trace serves every layer size
# and XLA sees only static shapes.
# ---------------------------------------------------------------------------------------------------

class StepVariants(NamedTuple):
    """The spec's variants as one step uses them (docs/equations.md, Variants): tensors in the work
    dtype, or None where switched off; the run-time constants as Python numbers."""

    w_hr_t: tf.Tensor | None = None  # weight_hr transposed, (H, P)
    w_ci: tf.Tensor | None = None
    w_cf: tf.Tensor | None = None
    w_co: tf.Tensor | None = None
    cell_clip: float | None = None
    proj_clip: float | None = None
    forget_bias: float = 0.0


def step(p_m, p_g, h, c, w_hh_t, w_mh_t, b_hh, b_mh, multiplicative, keep=None, variants=None):
    """One step from the input projection and the state ``(h, c)``; returns the new ``h, c`` and
    ``q`` (which the fused backward pass keeps instead of recomputing it).

    ``b_mh`` may be None when the caller has already added it to ``p_g`` (additive integration only).
    ``keep``: the recurrent dropout mask (B, P or H) (zeros and 1 / (1 - rate)) applied to ``h`` where it
    enters the step, which is only through ``weight_hh``; None: no dropout. ``variants``: a
    :class:`StepVariants`, or None for none at all (then no variant op is even traced).
    """
    h_in = h if keep is None else h * keep
    r = h_in * w_hh_t if w_hh_t.shape.rank == 1 else tf.matmul(h_in, w_hh_t)
    if b_hh is not None:
        r = r + b_hh
    q = tf.matmul(p_m * r, w_mh_t)
    if b_mh is not None:
        q = q + b_mh
    a = p_g * q if multiplicative else p_g + q
    i, o, f, a_z = tf.split(a, 4, axis=-1)
    if variants is not None:
        h, c = _variant_output(i, o, f, a_z, c, variants)
        return h, c, q
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(a_z)
    return tf.sigmoid(o) * tf.tanh(c), c, q


def _clip(value, bound):
    return value if bound is None else tf.clip_by_value(value, -bound, bound)


def _variant_output(a_i, a_o, a_f, a_z, c, v: StepVariants):
    """The new ``h, c`` from the gate pre-activations with the variants switched on in ``v``; the
    order of the terms is the spec's (mlstm_spec.equations)."""
    if v.w_ci is not None:  # i and f see the previous cell state
        a_i, a_f = a_i + v.w_ci * c, a_f + v.w_cf * c
    if v.forget_bias:
        a_f = a_f + v.forget_bias
    c = _clip(tf.sigmoid(a_f) * c + tf.sigmoid(a_i) * tf.tanh(a_z), v.cell_clip)
    if v.w_co is not None:  # o sees the new one
        a_o = a_o + v.w_co * c
    h = tf.sigmoid(a_o) * tf.tanh(c)
    if v.w_hr_t is not None:
        h = _clip(tf.matmul(h, v.w_hr_t), v.proj_clip)
    return h, c


def transposed(w_hh):
    """``w_hh`` transposed; a vector (independent recurrence) is returned as it is."""
    return w_hh if w_hh.shape.rank == 1 else tf.transpose(w_hh)


def _reader(sequence, steps=None):
    """A TensorArray holding ``sequence`` (T, ...) for reading one step at a time inside a loop.

    Reading through a TensorArray (not ``sequence[t]``) keeps the autodiff of the masked loop linear
    in T: the gradient of a slice of a loop-invariant tensor would be a full-size tensor per step.
    """
    steps = tf.shape(sequence)[0] if steps is None else steps
    return tf.TensorArray(sequence.dtype, size=steps, clear_after_read=False).unstack(sequence)


def _writer(like, steps):
    return tf.TensorArray(like.dtype, size=steps, element_shape=like.shape)


def _recomputed(p_m, p_g, q, h0, hs, c0, cs, w_hh, b_hh, keep, independent, multiplicative):
    """For a backward pass: every step's ``h_prev`` (as it entered ``weight_hh``, dropout applied),
    ``c_prev``, ``r``, ``m`` and the gate pre-activations ``a``, recomputed at once from the stored
    ``h``, ``c`` and ``q`` (one large product for ``r``, no sequential dependency)."""
    h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
    if keep is not None:
        h_prev = h_prev * keep
    c_prev = tf.concat([c0[None], cs[:-1]], axis=0)
    r = h_prev * w_hh if independent else tf.einsum("tbk,jk->tbj", h_prev, w_hh)
    if b_hh is not None:
        r = r + b_hh
    a = p_g * q if multiplicative else p_g + q
    return h_prev, c_prev, r, p_m * r, a


@functools.lru_cache(maxsize=None)
def _recurrence(independent: bool, multiplicative: bool, has_b_hh: bool, has_b_mh: bool, has_keep: bool):
    """The unmasked recurrence over a precomputed projection, with a hand-written backward pass.

    ``recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *extras) -> (hs, c_T)`` with ``p_m`` (T, B, H) and
    ``p_g`` (T, B, 4H) time-major, ``extras`` being ``b_hh``, ``b_mh`` and the recurrent dropout mask
    ``keep`` (B, H) as flagged (``b_mh`` only when it is not folded into ``p_g``). The forward loop
    stores ``h_t``, ``c_t`` and ``q_t = W_mh m_t + b_mh`` (the largest product). The backward pass
    recomputes every other intermediate for all steps at once (one large product for ``r``, no sequential dependency), runs
    one reverse loop with two matrix products per step, and forms the weight gradients afterwards as
    one matrix product each -- where autodiff of the loop would store every intermediate and do one
    small weight-gradient product per step.
    """

    @tf.custom_gradient
    def recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *extras):
        extras = list(extras)
        b_hh = extras.pop(0) if has_b_hh else None
        b_mh = extras.pop(0) if has_b_mh else None
        keep = extras.pop(0) if has_keep else None
        hs, _, c_last, cs, q = forward_loop(p_m, p_g, h0, c0, w_hh, w_mh, b_hh, b_mh, multiplicative,
                                            keep_for_backward=True, keep=keep)

        def grad(d_hs, d_c_last):
            d_hs = tf.zeros_like(hs) if d_hs is None else d_hs
            d_c_last = tf.zeros_like(c0) if d_c_last is None else d_c_last
            # Sizes come from the shapes of tensors the backward graph receives, never from the
            # forward's own size tensors: under XLA, a size passed between the two graphs is a value
            # that must be a compile-time constant, which would make XLA recompile for every input.
            steps = tf.shape(p_m)[0]
            h_prev, c_prev, r, m, a = _recomputed(p_m, p_g, q, h0, hs, c0, cs, w_hh, b_hh, keep, independent,
                                                  multiplicative)
            a_i, a_o, a_f, a_z = tf.split(a, 4, axis=-1)
            i, o, f, z = tf.sigmoid(a_i), tf.sigmoid(a_o), tf.sigmoid(a_f), tf.tanh(a_z)
            tanh_c = tf.tanh(cs)
            # In the loop: d_c += d_h * dc_dh;  d_a = concat(d_c, d_h, d_c, d_c) * da_dhc (blocks i, o, f, z)
            dc_dh = o * (1 - tanh_c * tanh_c)
            da_dhc = tf.concat(
                [z * i * (1 - i), tanh_c * o * (1 - o), c_prev * f * (1 - f), i * (1 - z * z)], axis=-1
            )
            d_hs_steps, dc_dh_steps, da_dhc_steps, p_m_steps, f_steps = (
                _reader(x, steps) for x in (d_hs, dc_dh, da_dhc, p_m, f))
            p_g_steps = _reader(p_g, steps) if multiplicative else None

            def back(k, d_h, d_c, d_as, d_ms):
                t = steps - 1 - k
                d_h = d_h + d_hs_steps.read(t)
                d_c = d_c + d_h * dc_dh_steps.read(t)
                d_a = tf.concat([d_c, d_h, d_c, d_c], axis=-1) * da_dhc_steps.read(t)
                d_q = d_a * p_g_steps.read(t) if multiplicative else d_a
                d_m = tf.matmul(d_q, w_mh)
                d_r = d_m * p_m_steps.read(t)
                d_h = d_r * w_hh if independent else tf.matmul(d_r, w_hh)
                if keep is not None:
                    d_h = d_h * keep
                return k + 1, d_h, d_c * f_steps.read(t), d_as.write(t, d_a), d_ms.write(t, d_m)

            _, d_h0, d_c0, d_as, d_ms = tf.while_loop(
                lambda k, *_: k < steps, back,
                (0, tf.zeros_like(h0), d_c_last, _writer(p_g[0], steps), _writer(h0, steps)),
                maximum_iterations=steps,
            )
            d_a, d_m = d_as.stack(), d_ms.stack()
            d_q = d_a * p_g if multiplicative else d_a
            d_p_g = d_a * q if multiplicative else d_a
            d_r = d_m * p_m
            d_w_mh = tf.einsum("tbj,tbk->jk", d_q, m)
            d_w_hh = (tf.reduce_sum(d_r * h_prev, axis=(0, 1)) if independent
                      else tf.einsum("tbj,tbk->jk", d_r, h_prev))
            d_biases = []
            if has_b_hh:
                d_biases.append(tf.reduce_sum(d_r, axis=(0, 1)))
            if has_b_mh:
                d_biases.append(tf.reduce_sum(d_q, axis=(0, 1)))
            d_keep = (None,) if has_keep else ()  # a dropout mask is not differentiated
            return (d_m * r, d_p_g, d_h0, d_c0, d_w_hh, d_w_mh, *d_biases, *d_keep)

        return (hs, c_last), grad

    return recurrence


@functools.lru_cache(maxsize=None)
def _variant_recurrence(independent: bool, multiplicative: bool, has_b_hh: bool, has_b_mh: bool, has_keep: bool,
                        projection: bool, peepholes: bool, cell_clip, proj_clip, forget_bias: float):
    """:func:`_recurrence` with the spec's variants: ``recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *extras)``
    with ``extras`` as there, then ``w_hr`` (with ``projection``) and ``w_ci, w_cf, w_co`` (with
    ``peepholes``); the run-time variants are constants of the graph.

    A separate function, so that the variant-free recurrence stays exactly what it was. The backward
    pass follows mlstm_spec.equations.run_backward: the same recomputation at once from the stored
    ``h, c, q`` as :func:`_recurrence`, plus the projection's input ``k = o tanh(c)`` and the masks of
    the clips (the derivative of a clip is 1 on the closed interval, 0 outside), then one reverse loop.
    """

    @tf.custom_gradient
    def recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *extras):
        extras = list(extras)
        b_hh = extras.pop(0) if has_b_hh else None
        b_mh = extras.pop(0) if has_b_mh else None
        keep = extras.pop(0) if has_keep else None
        w_hr = extras.pop(0) if projection else None
        w_ci, w_cf, w_co = extras if peepholes else (None, None, None)
        variants = StepVariants(None if w_hr is None else tf.transpose(w_hr), w_ci, w_cf, w_co, cell_clip,
                                proj_clip, forget_bias)
        hs, _, c_last, cs, q = forward_loop(p_m, p_g, h0, c0, w_hh, w_mh, b_hh, b_mh, multiplicative,
                                            keep_for_backward=True, keep=keep, variants=variants)

        def grad(d_hs, d_c_last):
            d_hs = tf.zeros_like(hs) if d_hs is None else d_hs
            d_c_last = tf.zeros_like(c0) if d_c_last is None else d_c_last
            steps = tf.shape(p_m)[0]  # from a tensor the backward graph receives (see _recurrence)
            h_prev, c_prev, r, m, a = _recomputed(p_m, p_g, q, h0, hs, c0, cs, w_hh, b_hh, keep, independent,
                                                  multiplicative)
            a_i, a_o, a_f, a_z = tf.split(a, 4, axis=-1)
            if peepholes:
                a_i, a_f, a_o = a_i + w_ci * c_prev, a_f + w_cf * c_prev, a_o + w_co * cs
            if forget_bias:
                a_f = a_f + forget_bias
            i, o, f, z = tf.sigmoid(a_i), tf.sigmoid(a_o), tf.sigmoid(a_f), tf.tanh(a_z)
            tanh_c = tf.tanh(cs)
            # In the loop: d_k (the gradient of o * tanh(c)) -> d_a_o = d_k * dao_dk, d_c += d_k * dc_dk
            # (+ d_a_o w_co), times the cell clip's mask; d_a_{i,f,z} = d_c * da_dc.
            dc_dk, dao_dk = o * (1 - tanh_c * tanh_c), tanh_c * o * (1 - o)
            da_dc = tf.concat([z * i * (1 - i), c_prev * f * (1 - f), i * (1 - z * z)], axis=-1)
            per_step = [d_hs, dc_dk, dao_dk, da_dc, p_m, f]
            if cell_clip is not None:
                inside = tf.logical_not(tf.abs(f * c_prev + i * z) > cell_clip)  # a NaN passes, as in the spec
                per_step.append(tf.cast(inside, cs.dtype))
            k_out = o * tanh_c
            if proj_clip is not None:
                inside = tf.logical_not(tf.abs(tf.einsum("tbh,ph->tbp", k_out, w_hr)) > proj_clip)
                per_step.append(tf.cast(inside, hs.dtype))
            readers = [_reader(x, steps) for x in per_step]
            p_g_steps = _reader(p_g, steps) if multiplicative else None

            def back(n, d_h, d_c, d_as, d_ms, d_hps):
                t = steps - 1 - n
                d_hs_t, dc_dk_t, dao_dk_t, da_dc_t, p_m_t, f_t, *masks = (x.read(t) for x in readers)
                d_h = d_h + d_hs_t
                if proj_clip is not None:
                    d_h = d_h * masks.pop()
                if projection:
                    d_hps = d_hps.write(t, d_h)
                    d_h = tf.matmul(d_h, w_hr)
                d_a_o = d_h * dao_dk_t
                d_c = d_c + d_h * dc_dk_t
                if peepholes:
                    d_c = d_c + d_a_o * w_co
                if cell_clip is not None:
                    d_c = d_c * masks.pop()
                d_a_i, d_a_f, d_a_z = tf.split(tf.concat([d_c, d_c, d_c], axis=-1) * da_dc_t, 3, axis=-1)
                d_a = tf.concat([d_a_i, d_a_o, d_a_f, d_a_z], axis=-1)
                d_q = d_a * p_g_steps.read(t) if multiplicative else d_a
                d_m = tf.matmul(d_q, w_mh)
                d_r = d_m * p_m_t
                d_h = d_r * w_hh if independent else tf.matmul(d_r, w_hh)
                if keep is not None:
                    d_h = d_h * keep
                d_c = d_c * f_t
                if peepholes:
                    d_c = d_c + d_a_i * w_ci + d_a_f * w_cf
                return n + 1, d_h, d_c, d_as.write(t, d_a), d_ms.write(t, d_m), d_hps

            d_hps = _writer(h0, steps) if projection else 0
            _, d_h0, d_c0, d_as, d_ms, d_hps = tf.while_loop(
                lambda n, *_: n < steps, back,
                (0, tf.zeros_like(h0), d_c_last, _writer(p_g[0], steps), _writer(c0, steps), d_hps),
                maximum_iterations=steps,
            )
            d_a, d_m = d_as.stack(), d_ms.stack()
            d_q = d_a * p_g if multiplicative else d_a
            d_p_g = d_a * q if multiplicative else d_a
            d_r = d_m * p_m
            grads = [d_m * r, d_p_g, d_h0, d_c0,
                     tf.reduce_sum(d_r * h_prev, axis=(0, 1)) if independent
                     else tf.einsum("tbj,tbk->jk", d_r, h_prev),
                     tf.einsum("tbj,tbk->jk", d_q, m)]
            if has_b_hh:
                grads.append(tf.reduce_sum(d_r, axis=(0, 1)))
            if has_b_mh:
                grads.append(tf.reduce_sum(d_q, axis=(0, 1)))
            if has_keep:
                grads.append(None)  # a dropout mask is not differentiated
            if projection:
                grads.append(tf.einsum("tbp,tbh->ph", d_hps.stack(), k_out))
            if peepholes:
                d_a_i, d_a_o, d_a_f, _ = tf.split(d_a, 4, axis=-1)
                grads += [tf.reduce_sum(d_a_i * c_prev, axis=(0, 1)), tf.reduce_sum(d_a_f * c_prev, axis=(0, 1)),
                          tf.reduce_sum(d_a_o * cs, axis=(0, 1))]
            return tuple(grads)

        return (hs, c_last), grad

    return recurrence


def _unrolled_loop(p_m, p_g, h0, c0, mask, w_hh, w_mh, b_hh, b_mh, multiplicative, zero_output_for_mask,
                   keep=None, variants=None):
    """The recurrence as one copy of the step per time step (``unroll=True``; T must be static), with
    or without a (T, B) mask (the semantics of :func:`forward_loop`), differentiated by autodiff. The
    graph holds no loop and no TensorArray, which is what TFLite converts with a dynamic batch size."""
    w_hh_t, w_mh_t = transposed(w_hh), tf.transpose(w_mh)
    h, c = h0, c0
    out = zeros = tf.zeros_like(h0)
    outs = []
    for t, (p_m_t, p_g_t) in enumerate(zip(tf.unstack(p_m), tf.unstack(p_g))):
        h_new, c_new, _ = step(p_m_t, p_g_t, h, c, w_hh_t, w_mh_t, b_hh, b_mh, multiplicative, keep, variants)
        if mask is None:
            h, c, out = h_new, c_new, h_new
        else:
            valid = mask[t][:, None]
            out = tf.where(valid, h_new, zeros if zero_output_for_mask else out)
            h, c = tf.where(valid, h_new, h), tf.where(valid, c_new, c)
        outs.append(out)
    return tf.stack(outs), h, c


def forward_loop(p_m, p_g, h0, c0, w_hh, w_mh, b_hh, b_mh, multiplicative, mask=None,
                 zero_output_for_mask=False, keep_for_backward=False, keep=None, variants=None):
    """The time loop: ``(outputs, h_T, c_T, cs, qs)``, ``outputs`` (T, B, H) (P wide with a projection).

    With a (T, B) boolean ``mask``, a masked step keeps the state and outputs the previous output (zeros
    before the first valid step), or zeros with ``zero_output_for_mask``: the semantics of
    ``keras.layers.RNN``. With ``keep_for_backward`` it also stores every ``c_t`` and
    ``q_t = W_mh m_t + b_mh`` (``cs``, ``qs``; None otherwise) for the hand-written backward.
    ``keep``, ``variants``: those of :func:`step`.
    """
    steps = tf.shape(p_m)[0]
    w_hh_t, w_mh_t = transposed(w_hh), tf.transpose(w_mh)
    m_steps, g_steps = _reader(p_m), _reader(p_g)
    valid_steps = None if mask is None else _reader(mask)
    zeros = tf.zeros_like(h0)

    def body(t, h, c, out, outs, cs, qs):
        h_new, c_new, q = step(m_steps.read(t), g_steps.read(t), h, c, w_hh_t, w_mh_t, b_hh, b_mh,
                               multiplicative, keep, variants)
        if valid_steps is None:
            h, c, out = h_new, c_new, h_new
        else:
            valid = valid_steps.read(t)[:, None]
            out = tf.where(valid, h_new, zeros if zero_output_for_mask else out)
            h, c = tf.where(valid, h_new, h), tf.where(valid, c_new, c)
        if keep_for_backward:
            cs, qs = cs.write(t, c), qs.write(t, q)
        return t + 1, h, c, out, outs.write(t, out), cs, qs

    stored = (_writer(c0, steps), _writer(p_g[0], steps)) if keep_for_backward else (0, 0)
    _, h, c, _, outs, cs, qs = tf.while_loop(
        lambda t, *_: t < steps, body, (0, h0, c0, zeros, _writer(h0, steps), *stored),
        maximum_iterations=steps,
    )
    if not keep_for_backward:
        return outs.stack(), h, c, None, None
    return outs.stack(), h, c, cs.stack(), qs.stack()


class FusedConfig(NamedTuple):
    """Everything that changes the traced graph of the fused path (one tf.function per value)."""

    independent: bool
    multiplicative: bool
    bias: bool
    recurrent_bias: bool
    multiplicative_bias: bool
    masked: bool
    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    jit_compile: bool
    unroll: bool = False
    recurrent_dropout: bool = False
    # The spec's variants: structural ones add weights to the arguments, run-time ones are constants
    # of the traced graph.
    projection: bool = False
    peepholes: bool = False
    cell_clip: float | None = None
    proj_clip: float | None = None
    forget_bias: float = 0.0

    @property
    def variants(self) -> bool:
        """Whether any variant is switched on (none: the graph is the variant-free one)."""
        return (self.projection or self.peepholes or self.cell_clip is not None or self.proj_clip is not None
                or bool(self.forget_bias))


class FusedBody:
    """The whole fused layer body for one configuration, as a plain callable.

    Called as ``body(xs, h0, c0, [mask], [keep], w_ih, w_hh, w_mh, [b_ih], [b_hh], [b_mh], [w_hr],
    [w_ci, w_cf, w_co])`` with only the bracketed arguments that the configuration switches on, it
    returns ``(last_output, outputs, h_T, c_T)``; outputs are (B, T, H) with ``return_sequences``, else
    (B, 1, H) (P instead of H with a projection). (An object rather than a closure: TensorFlow counts
    retraces per function code, and one closure per configuration would look like one function
    retracing.)
    """

    def __init__(self, config: FusedConfig):
        self.config = config

    def __call__(self, *args):
        config = self.config
        args = list(args)
        xs, h0, c0 = args[:3]
        mask = args.pop(3) if config.masked else None
        keep = args.pop(3) if config.recurrent_dropout else None
        w_ih, w_hh, w_mh = args[3:6]
        biases = iter(args[6:])
        b_ih, b_hh, b_mh = (next(biases) if flag else None
                            for flag in (config.bias, config.recurrent_bias, config.multiplicative_bias))
        variant_weights = list(biases)  # [w_hr], [w_ci, w_cf, w_co]
        variants = _step_variants(config, iter(variant_weights)) if config.variants else None
        x_steps = tf.transpose(xs, [1, 0, 2])  # time-major (T, B, I): each step is contiguous
        if config.masked:
            mask = tf.transpose(mask, [1, 0])
        if config.go_backwards:
            x_steps = tf.reverse(x_steps, [0])
            if config.masked:
                mask = tf.reverse(mask, [0])
        steps, batch = tf.shape(x_steps)[0], tf.shape(x_steps)[1]
        x_rows = tf.reshape(x_steps, [steps * batch, -1])
        # The projection of the whole sequence: block m and the four gate blocks as two products.
        w_blocks = tf.split(w_ih, 5, axis=0)
        p_m = tf.matmul(x_rows, w_blocks[0], transpose_b=True)
        p_g = tf.matmul(x_rows, tf.concat(w_blocks[1:], axis=0), transpose_b=True)
        b_m = b_g = None
        if config.bias:
            b_blocks = tf.split(b_ih, 5, axis=0)
            b_m, b_g = b_blocks[0], tf.concat(b_blocks[1:], axis=0)
        # With additive integration bias_mh adds to the gate blocks just like bias_ih: fold it into
        # the projection, so the loop does one addition less per step.
        fold_b_mh = config.multiplicative_bias and not config.multiplicative
        if fold_b_mh:
            b_g = b_mh if b_g is None else b_g + b_mh
        if b_m is not None:
            p_m = tf.nn.bias_add(p_m, b_m)
        if b_g is not None:
            p_g = tf.nn.bias_add(p_g, b_g)
        # tf.shape sizes leave the static shape unknown; restore what is known of it (T, B from xs, H from
        # the weights), or the outputs lose their time axis in a graph and loop buffers their element
        # shape (which TFLite needs).
        time, rows = xs.shape[1], xs.shape[0]
        if config.projection:  # h is P wide, c H wide
            hidden = w_mh.shape[1] if w_mh.shape[1] is not None else c0.shape[-1]
            width = variants.w_hr_t.shape[1] if variants.w_hr_t.shape[1] is not None else h0.shape[-1]
        else:
            hidden = width = w_mh.shape[1] if w_mh.shape[1] is not None else h0.shape[-1]
        h0, c0 = _with_shape(h0, [rows, width]), _with_shape(c0, [rows, hidden])
        p_m = _with_shape(tf.reshape(p_m, [steps, batch, -1]), [time, rows, hidden])
        p_g = _with_shape(tf.reshape(p_g, [steps, batch, -1]),
                          [time, rows, None if hidden is None else 4 * hidden])
        b_mh_inside = None if fold_b_mh else b_mh
        if config.unroll:
            if time is None:
                raise ValueError("unroll=True needs sequences with a known number of steps T, got shape "
                                 f"{tuple(xs.shape)}")
            outs, h, c = _unrolled_loop(p_m, p_g, h0, c0, mask, w_hh, w_mh, b_hh, b_mh_inside,
                                        config.multiplicative, config.zero_output_for_mask, keep, variants)
        elif config.masked:
            outs, h, c, _, _ = forward_loop(p_m, p_g, h0, c0, w_hh, w_mh, b_hh, b_mh_inside,
                                            config.multiplicative, mask, config.zero_output_for_mask,
                                            keep=keep, variants=variants)
        elif variants is not None:
            recurrence = _variant_recurrence(
                config.independent, config.multiplicative, config.recurrent_bias, b_mh_inside is not None,
                keep is not None, config.projection, config.peepholes, config.cell_clip, config.proj_clip,
                config.forget_bias)
            inside = [b for b in (b_hh, b_mh_inside, keep) if b is not None] + variant_weights
            outs, c = recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *inside)
            h = outs[-1]
        else:
            recurrence = _recurrence(config.independent, config.multiplicative,
                                     config.recurrent_bias, b_mh_inside is not None, keep is not None)
            inside = [b for b in (b_hh, b_mh_inside, keep) if b is not None]
            outs, c = recurrence(p_m, p_g, h0, c0, w_hh, w_mh, *inside)
            h = outs[-1]
        outs = _with_shape(outs, [time, rows, width])
        h, c = _with_shape(h, [rows, width]), _with_shape(c, [rows, hidden])
        last = outs[-1]
        outputs = tf.transpose(outs, [1, 0, 2]) if config.return_sequences else last[:, None, :]
        return last, outputs, h, c


def _step_variants(config: FusedConfig, weights) -> StepVariants:
    """The :class:`StepVariants` of ``config`` from the remaining arguments ``[w_hr], [w_ci, w_cf, w_co]``."""
    w_hr_t = tf.transpose(next(weights)) if config.projection else None
    w_ci, w_cf, w_co = (next(weights) for _ in range(3)) if config.peepholes else (None,) * 3
    return StepVariants(w_hr_t, w_ci, w_cf, w_co, config.cell_clip, config.proj_clip, config.forget_bias)


def _with_shape(tensor, shape):
    """``tensor`` with what is known of its static shape merged with ``shape`` (None: unknown); no op."""
    tensor.set_shape(tf.TensorShape(shape).merge_with(tensor.shape))
    return tensor



@functools.lru_cache(maxsize=None)
def fused_function(config: FusedConfig, dtype: str):
    """``(compiled, plain)``: the fused body for ``config`` as a cached ``tf.function`` (XLA-compiled
    with ``config.jit_compile``), and as the plain callable. The compiled function's signature leaves
    every size dynamic, so there is exactly one trace per configuration and dtype, whatever the batch
    size, sequence length or layer size (unrolled: one trace per input shape).
    """
    matrix, vector = tf.TensorSpec([None, None], dtype), tf.TensorSpec([None], dtype)
    signature = [tf.TensorSpec([None, None, None], dtype), matrix, matrix]
    if config.masked:
        signature.append(tf.TensorSpec([None, None], tf.bool))
    if config.recurrent_dropout:
        signature.append(matrix)
    signature += [matrix, vector if config.independent else matrix, matrix]
    signature += [vector for flag in (config.bias, config.recurrent_bias, config.multiplicative_bias) if flag]
    signature += [matrix] if config.projection else []
    signature += [vector] * 3 if config.peepholes else []
    plain = FusedBody(config)
    if config.unroll:  # one trace per sequence shape: the unrolled graph depends on T
        return tf.function(plain, jit_compile=config.jit_compile), plain
    return tf.function(plain, input_signature=signature, jit_compile=config.jit_compile), plain
