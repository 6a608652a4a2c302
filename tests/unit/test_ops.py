"""The kernels' operations (exl2conv.ops), checked without a GPU: every kernel of the extension has
a named torch reference, and on the CPU every operation runs its reference."""

import inspect

import pytest
import torch

from exl2conv import kernels, ops
from tests.opcases import CASES


def test_every_kernel_has_a_named_reference():
    """A kernel listed in kernels.OPS without an entry in ops.REGISTRY, or whose reference is not a
    named function of exl2conv.ops, would have nothing to be checked against on a GPU."""
    missing = [name for name in kernels.OPS if name not in ops.REGISTRY]
    assert not missing, f"kernels without a torch reference in exl2conv.ops.REGISTRY: {missing}"
    assert set(ops.REGISTRY) == set(kernels.OPS), "a registry entry without a kernel"
    for name, op in ops.REGISTRY.items():
        ref = op.reference
        assert inspect.isfunction(ref) and ref.__name__ == f"{name}_ref", (name, ref)
        assert getattr(ops, ref.__name__) is ref and ref.__doc__, name
        assert op.dispatch is getattr(ops, name), name
    assert set(CASES) == set(kernels.OPS), "every kernel needs a parity case (tests/opcases.py)"


@pytest.mark.parametrize("name", kernels.OPS)
def test_on_the_cpu_each_operation_is_its_reference(name):
    """On the CPU no kernel runs: each operation gives its reference's results, exactly; this also
    runs the GPU parity test's inputs and checks (tests/gpu/test_kernels.py)."""
    op, case = ops.REGISTRY[name], CASES[name]
    args = case.make("cpu")
    assert ops.kernel(name, torch.zeros(1)) is None
    got = case.outputs(op.dispatch(*args), args)
    args = case.make("cpu")
    want = case.outputs(op.reference(*args), args)
    for g, w in zip(got, want):
        assert torch.equal(g, w) and g.stride() == w.stride()
    case.check(got, want)
