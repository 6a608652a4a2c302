"""Asymmetric calibration inside a module (``EXL2CONV_ASYMMETRIC=1`` or ``2``): o_proj and down_proj
fitted to the unquantized module's outputs from the inputs that the quantized q/k/v or gate/up
give them.

By default every linear of a module gets its Hessian from the unquantized module on the pass's
states, and GPTQ fits ``X Q ~ X W``. For the module's second linear the inputs change once the
first linears are quantized (``X_q``: the attention output of the quantized q/k/v, the product of
the quantized gate and up), and the error they carry can be partly cancelled by the second linear:
its codes are chosen for ``X_q Q ~ X W``. GPTQ runs on ``X_q^T X_q``, then the codes descend
(:func:`exl2conv.rounding.descend`) on that objective with ``cross = X_q^T X``, both damped like
GPTQ's Hessian (level 1), or down_proj's descent more (level 2: :data:`DOWN_DAMP`). The grid stays
GPTQ's, so the tensors pack and decode as any other.

This stays on the grid and inside one module; the asymmetric calibration that failed in sessions 5
and 7 (docs/quality.md) refitted every linear's continuous weight to the unquantized model's stream
by a ridge solve. Cost: two more forwards of the module over the pass's rows, and the descent.
"""

from __future__ import annotations

import dataclasses

import torch

from exl2conv import gptq, rounding, settings
from exl2conv.gptq import Prepared, QuantResult
from exl2conv.layers import ModuleRun, padded_wt
from exl2conv.model.arch import LinearSpec

SECOND_INPUTS = ("attn_output", "pre_down")  # the intermediates that feed o_proj and down_proj
DAMP = gptq.PERCDAMP  # the descent's ridge, as GPTQ's own damping (the study's better choice)
# down_proj's ridge at level 2. At DAMP its many inputs (1536 in SmolLM2) overfit few fit rows:
# up to +10 % module error against plain GPTQ on held-back rows unlike the fit rows. 0.5 did
# better than DAMP on those in all six studied cases and was within 1.2 points of it on like
# rows; 2.0 was up to 7.6 points worse there (docs/quality.md, session 23). o_proj (576 inputs)
# did not overfit; 0.5 moved its error by under a point on like rows, so it keeps DAMP.
DOWN_DAMP = 0.5
DOWN_INPUT = "pre_down"


def level() -> int:
    """``EXL2CONV_ASYMMETRIC``: 0 off, 1 every second linear's descent damped by :data:`DAMP`, 2
    down_proj's by :data:`DOWN_DAMP`."""
    return int(settings.active().asymmetric)


def enabled() -> bool:
    return level() > 0


def damp_for(spec: LinearSpec) -> float:
    """The descent's ridge for ``spec`` at the active level."""
    return DOWN_DAMP if level() >= 2 and spec.hessian_input == DOWN_INPUT else DAMP


def applies(run: ModuleRun, spec: LinearSpec) -> bool:
    """Whether ``spec`` is the second linear of a plain attention or MLP module (not an expert's)."""
    return run.kind in ("attn", "mlp") and spec.expert is None and spec.hessian_input in SECOND_INPUTS


def input_statistics(run: ModuleRun, states: torch.Tensor, quantized: dict, spec: LinearSpec
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_q^T X_q, X_q^T X)`` over all rows of ``states``, divided by the row count (as
    :meth:`gptq.Hessian.normalized`): ``X_q`` the input of ``spec`` with the module's weights
    ``quantized`` (the linears quantized so far), ``X`` with its unquantized weights. float32
    ``[K, K]`` each, on the device the module runs on."""
    dev = run.device or states.device
    k = spec.in_features
    h = torch.zeros(k, k, dtype=torch.float32, device=dev)
    cross = torch.zeros(k, k, dtype=torch.float32, device=dev)
    rows = states.shape[0]
    for r0 in range(0, rows, run.chunk):
        x = states[r0:r0 + run.chunk].to(dev)
        a = run.forward(x, weights=quantized, capture=True)[1][spec.hessian_input]
        b = run.forward(x, capture=True)[1][spec.hessian_input]
        a = a.reshape(-1, k).to(torch.float32)
        h.addmm_(a.T, a)
        cross.addmm_(a.T, b.reshape(-1, k).to(torch.float32))
        del a, b
    return h.div_(max(rows, 1)), cross.div_(max(rows, 1))


def fitted(w: torch.Tensor, spec: LinearSpec, h: torch.Tensor, cross: torch.Tensor, damp: float = DAMP):
    """``(prepared, refine)`` for :func:`exl2conv.quantize.quantize_linear`: GPTQ's factor of ``h``,
    and the step that moves GPTQ's codes towards ``X_q Q ~ X W`` (w: the HF weight ``[out, in]``;
    damp: the descent's ridge, of the mean diagonal of ``h``)."""
    prep = gptq.prepare(h.clone(), spec.name)

    def refine(res: QuantResult) -> QuantResult:
        perm = prep.perm.to(h.device)
        zero, top, scale = rounding.grid_rows(res.groups, res.qs, res.qscale_max, spec.in_features)
        hp, cp = rounding.damped(h[perm][:, perm], cross[perm][:, perm], damp)
        wt = padded_wt(w, spec, perm.to(w.device)).to(h.device)
        codes, q, _, _ = rounding.descend(wt, res.codes, zero, top, scale, hp, cp)
        return dataclasses.replace(res, codes=codes, q=q)

    return prep, refine


def prepared(run: ModuleRun, states: torch.Tensor, quantized: dict, key: str, spec: LinearSpec
             ) -> tuple[Prepared, object]:
    """:func:`fitted` of ``spec`` from :func:`input_statistics` of the pass's states."""
    h, cross = input_statistics(run, states, quantized, spec)
    return fitted(run.weights[key], spec, h, cross, damp_for(spec))
