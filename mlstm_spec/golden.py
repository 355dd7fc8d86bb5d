"""Golden vectors: small, fixed cases computed by the spec, for checking other languages (Julia) against it.

Run from the repository root to (re)write the committed files::

    python -m mlstm_spec.golden                 # writes tests/data/golden/
    python -m mlstm_spec.golden --out DIR       # anywhere else

Every case is one safetensors file ``<name>.safetensors``; ``index.json`` lists them. The 16 cases are
a two-level fractional factorial design (2^(8-4), resolution IV) over eight options: ``bias``,
``recurrent_bias``, ``multiplicative_bias`` and the integration mode vary fully (so every bias-flag
combination appears with both integration modes), and ``independent_recurrence``, batched or not,
``T = 1`` or ``T = 5``, and float32 or float64 are the parities of three of those four each. Every pair
of options therefore meets in all four of its combinations.

Each file holds, by logical index in NumPy's row-major orientation (names are exact):

=====================================  ==================================================================
tensor                                 meaning
=====================================  ==================================================================
``weight_ih`` ... ``bias_mh``          the canonical parameters (only the biases switched on)
``xs``                                 inputs, ``(B, T, I)`` batched or ``(T, I)`` unbatched
``h0``, ``c0``                         initial state, ``(B, H)`` or ``(H,)``
``hs``, ``h_T``, ``c_T``               outputs for every step and the final state
``d_hs``, ``d_h_T``, ``d_c_T``         cotangents defining the loss below
``grad.<param>``, ``grad.x``,          gradients of ``L = sum(hs * d_hs) + sum(h_T * d_h_T)
``grad.h0``, ``grad.c0``               + sum(c_T * d_c_T)`` with respect to each parameter, xs, h0, c0
``layout_probe``                       ``(2, 3)`` with value ``3 * row + column`` (0-based): lets a reader
                                       check that it keeps logical indices
=====================================  ==================================================================

The header metadata records the case's options (``"true"``/``"false"``), ``integration_mode``,
``dtype``, the sizes, the loss, and the orientation convention. SafeTensors.jl presents every tensor
with the same shape and logical indices as NumPy, so Julia needs no change for parameters, and
``permutedims(x, ndims(x):-1:1)`` to turn ``xs (B, T, I)`` into its ``(I, T, B)`` (and a state
``(B, H)`` into ``(H, B)``).

Values: parameters, inputs, initial states and cotangents are drawn from ``numpy.random.default_rng``
with a fixed seed per case, in float64, then rounded to the case's dtype. Outputs and gradients are
the spec's float64 results on those (rounded) values, rounded once to the case's dtype, so a float32
case holds the best float32 answer and measures only the error of the implementation under test.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .equations import BIAS_FLAGS, INTEGRATION_MODES
from .params import init_params
from .reference import backward, forward

FORMAT_NAME = "mlstm-spec.golden"
FORMAT_VERSION = 1
INPUT_SIZE, HIDDEN_SIZE, BATCH_SIZE, LONG_T = 3, 4, 2, 5
LOSS = "L = sum(hs .* d_hs) + sum(h_T .* d_h_T) + sum(c_T .* d_c_T); grad.<name> = dL/d<name>"
CONVENTION = (
    "tensors stored by logical index in NumPy row-major orientation: xs (B, T, I) or (T, I), hs "
    "(B, T, H) or (T, H), states (B, H) or (H,); parameters in canonical orientation. SafeTensors.jl "
    "keeps these shapes and indices; in Julia permutedims(a, ndims(a):-1:1) gives (I, T, B) and (H, B)."
)
REFERENCE = (
    "inputs drawn in float64 and rounded to dtype; outputs and gradients computed by mlstm_spec in "
    "float64 from the rounded inputs, then rounded to dtype"
)
#: A (2, 3) tensor with value ``3 * row + column`` (0-based): a reader that keeps logical indices sees
#: ``probe[0, 1] == 1`` (Julia: ``probe[1, 2] == 1``); one that reverses or reinterprets axes does not.
LAYOUT_PROBE = np.arange(6.0).reshape(2, 3)
#: Tensors drawn at random (bit-identical on regeneration); the rest are computed.
DRAWN = ("weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh", "xs", "h0", "c0",
         "d_hs", "d_h_T", "d_c_T")


@dataclass(frozen=True)
class GoldenCase:
    index: int
    bias: bool
    recurrent_bias: bool
    multiplicative_bias: bool
    integration_mode: str
    independent_recurrence: bool
    batched: bool
    steps: int
    dtype: str

    @property
    def name(self) -> str:
        flags = "".join(c for c, on in zip("ihm", (self.bias, self.recurrent_bias, self.multiplicative_bias)) if on)
        return "_".join([
            f"{self.index:02d}", self.dtype, f"B{BATCH_SIZE}" if self.batched else "unbatched", f"T{self.steps}",
            "add" if self.integration_mode == "addition" else "mult",
            f"bias-{flags}" if flags else "nobias",
        ] + (["indep"] if self.independent_recurrence else []))

    @property
    def options(self) -> dict:
        return dict(bias=self.bias, recurrent_bias=self.recurrent_bias,
                    multiplicative_bias=self.multiplicative_bias,
                    independent_recurrence=self.independent_recurrence)

    @property
    def seed(self) -> int:
        return 20160927 + self.index  # fixed per case; the paper's arXiv date plus the case number


def cases() -> list[GoldenCase]:
    """The 16 cases of the 2^(8-4) design described in the module docstring."""
    out = []
    for index in range(16):
        a, b, c, d = (index >> 3) & 1, (index >> 2) & 1, (index >> 1) & 1, index & 1
        out.append(GoldenCase(
            index=index,
            bias=bool(a), recurrent_bias=bool(b), multiplicative_bias=bool(c),
            integration_mode=INTEGRATION_MODES[d],
            independent_recurrence=bool(a ^ b ^ c),
            batched=bool(a ^ b ^ d),
            steps=LONG_T if a ^ c ^ d else 1,
            dtype="float64" if b ^ c ^ d else "float32",
        ))
    return out


def draw(case: GoldenCase) -> dict:
    """The drawn tensors of a case (parameters, inputs, initial state, cotangents), in its dtype."""
    rng = np.random.default_rng(case.seed)
    params = init_params(INPUT_SIZE, HIDDEN_SIZE, rng=rng, dtype=np.float64, **case.options)
    for name in BIAS_FLAGS:
        if name in params:  # init_params starts biases at zero; give them values that matter
            params[name] = rng.uniform(-0.5, 0.5, size=params[name].shape)
    lead = (BATCH_SIZE,) if case.batched else ()
    arrays = dict(params)
    arrays["xs"] = rng.standard_normal(lead + (case.steps, INPUT_SIZE))
    arrays["h0"] = rng.uniform(-0.5, 0.5, size=lead + (HIDDEN_SIZE,))
    arrays["c0"] = rng.standard_normal(lead + (HIDDEN_SIZE,))
    arrays["d_hs"] = rng.standard_normal(lead + (case.steps, HIDDEN_SIZE))
    arrays["d_h_T"] = rng.standard_normal(lead + (HIDDEN_SIZE,))
    arrays["d_c_T"] = rng.standard_normal(lead + (HIDDEN_SIZE,))
    return {name: value.astype(case.dtype) for name, value in arrays.items()}


def compute(case: GoldenCase, drawn: dict) -> dict:
    """Outputs and gradients of a case: the spec in float64 on the drawn values, rounded to its dtype."""
    wide = {name: value.astype(np.float64) for name, value in drawn.items()}
    params = {name: wide[name] for name in DRAWN[:6] if name in wide}
    state = (wide["h0"], wide["c0"])
    hs, (h_T, c_T) = forward(params, wide["xs"], state, integration_mode=case.integration_mode)
    grads = backward(params, wide["xs"], state, wide["d_hs"], (wide["d_h_T"], wide["d_c_T"]),
                     integration_mode=case.integration_mode)
    out = dict(hs=hs, h_T=h_T, c_T=c_T, **{f"grad.{name}": value for name, value in grads.items()})
    out["layout_probe"] = LAYOUT_PROBE
    return {name: value.astype(case.dtype) for name, value in out.items()}


def metadata(case: GoldenCase) -> dict:
    from .io import FORMULATION

    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "case": case.name,
        "integration_mode": case.integration_mode,
        "dtype": case.dtype,
        "batched": str(case.batched).lower(),
        "T": str(case.steps),
        "B": str(BATCH_SIZE if case.batched else 1),
        "I": str(INPUT_SIZE),
        "H": str(HIDDEN_SIZE),
        "seed": str(case.seed),
        "loss": LOSS,
        "convention": CONVENTION,
        "reference": REFERENCE,
        "formulation": FORMULATION,
        "generator": "python -m mlstm_spec.golden",
    }
    meta.update({name: str(value).lower() for name, value in case.options.items()})
    return meta


def case_tensors(case: GoldenCase) -> dict:
    drawn = draw(case)
    return {**drawn, **compute(case, drawn)}


def write(out_dir) -> list[Path]:
    """Write every case and ``index.json`` into ``out_dir``; returns the paths written."""
    from .io import _safetensors

    safetensors = _safetensors()  # names the `io` extra when missing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for case in cases():
        path = out_dir / f"{case.name}.safetensors"
        tensors = {name: np.ascontiguousarray(value) for name, value in case_tensors(case).items()}
        path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata(case)))
        written.append(path)
        index.append(dict(name=case.name, file=path.name, dtype=case.dtype, batched=case.batched, T=case.steps,
                          integration_mode=case.integration_mode, **case.options))
    index_path = out_dir / "index.json"
    index_path.write_text(json.dumps(
        dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, loss=LOSS, convention=CONVENTION,
             reference=REFERENCE, cases=index), indent=1) + "\n")
    return written + [index_path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlstm_spec.golden", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/golden", help="directory to write (default: %(default)s)")
    args = parser.parse_args(argv)
    paths = write(args.out)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths) - 1} cases and index.json to {args.out} ({total / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
