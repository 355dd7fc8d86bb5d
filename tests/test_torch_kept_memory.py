"""A training call's large arrays (the forward's tape, the backward's scratch) come from blocks that the
compiled loops keep from call to call (``KeptBlocks`` in ``cpu_loops.cpp``), so that a later call does
not fault their pages in again. A block must serve a later call without carrying its old values into
it, and ``MLSTM_TORCH_KEPT_MEGABYTES=0`` must keep none. The time this saves is shown by
``benchmarks/bench_torch.py``, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compiled_torch_loops, require_backend

bt = require_backend("torch")

import torch  # noqa: E402

from mlstm_spec.conformance import relative_error, tolerance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The tape's largest array, T*B*4H float64 values, is 2.4 MB here: over the 1 MB from which arrays
# come from the kept blocks.
STEPS, BATCH, INPUTS, HIDDEN = 24, 12, 16, 256


@pytest.fixture(scope="module")
def compiled():
    return compiled_torch_loops()


def outputs_and_gradients(layer, x):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, (h_n, c_n) = layer(x)
    (out.sum() + 0.5 * h_n.sum() - c_n.sum()).backward()
    return [t.detach() for t in (out, h_n, c_n, x.grad, *(p.grad for p in layer.parameters()))]


@pytest.mark.parametrize("options", [dict(), dict(integration_mode="multiplicative_integration"),
                                     dict(peepholes=True, cell_clip=1.0, proj_size=HIDDEN // 2)],
                         ids=["addition", "multiplicative", "variants"])
def test_a_kept_block_serves_the_next_call_without_its_old_values(compiled, options):
    """A call on NaN inputs fills its tape and scratch with NaN and leaves them to the pool; the next
    call of the same shape takes those blocks and must still equal the plain path (autograd over torch
    operations) on every output and gradient, which it cannot if it reads a value it did not write.
    A third call must find its blocks in the pool rather than allocate more."""
    torch.manual_seed(0)
    layer = bt.MLSTM(INPUTS, HIDDEN, dtype=torch.float64, **options)
    plain = bt.MLSTM(INPUTS, HIDDEN, dtype=torch.float64, fused=False, **options)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    poisoned = outputs_and_gradients(layer, torch.full_like(x, float("nan")))
    assert all(t.isnan().any() for t in poisoned[:4])
    held = compiled.kept_free_bytes()
    assert held >= STEPS * BATCH * 4 * HIDDEN * 8, f"only {held} bytes kept after a training call"
    got, want = outputs_and_gradients(layer, x), outputs_and_gradients(plain, x)
    for index, (g, w) in enumerate(zip(got, want)):
        error, where = relative_error(g.numpy(), w.numpy())
        assert error <= tolerance("float64"), f"result {index}: relative error {error:.2e} at {where}"
    assert compiled.kept_free_bytes() == held
    outputs_and_gradients(layer, x)
    assert compiled.kept_free_bytes() == held


# Training calls of two shapes, the free bytes held after each (MLSTM_TORCH_KEPT_MEGABYTES is read once
# per process, hence a fresh one per setting).
_KEPT_SCRIPT = """
import json, torch
from backends.torch import MLSTM, build
held = []
for steps, hidden in ((40, 256), (60, 512)):
    layer = MLSTM(16, hidden)
    x = torch.randn(steps, 16, 16, requires_grad=True)
    layer(x)[0].sum().backward()
    assert x.grad.abs().sum() > 0
    held.append(build.cpu_loops().kept_free_bytes())
print(json.dumps(held))
"""


def kept_after_two_shapes(megabytes):
    environment = dict(os.environ, MLSTM_TORCH_KEPT_MEGABYTES=megabytes)
    run = subprocess.run([sys.executable, "-c", _KEPT_SCRIPT], cwd=REPO, env=environment,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_no_block_is_kept_with_the_setting_at_zero(compiled):
    assert kept_after_two_shapes("0") == [0, 0]


def test_the_free_blocks_kept_stay_within_the_setting(compiled):
    """The second shape's tape alone (60 x 16 x 2048 float32 values in K, four more arrays of a quarter
    of that) needs more than the 6 MB allowed: the pool drops blocks to stay within it, but keeps some."""
    held = kept_after_two_shapes("6")
    assert all(0 < each <= 6 << 20 for each in held), held
