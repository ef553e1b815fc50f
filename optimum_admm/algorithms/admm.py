"""ADMM weight update with gradual mask selection.

Paper: Boža, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR 2024,
https://arxiv.org/abs/2401.02938 (reference code: fmfi-compbio/admm-pruning).

For one linear layer with dense weights ``W0`` (out x in) and calibration Gram ``G = X^T X`` (in x in), find a sparse
``W`` minimising ``tr((W - W0) G (W - W0)^T)``. In the preconditioned space (``d = sqrt(diag G)``):

    G^ = D^-1 G D^-1          (unit diagonal)     V0 = (W0 D)^T      (|V0| is the Wanda score)
    H  = G^ + lambda I,  lambda = dampening * mean(diag G^)           B = H V0  (damping pulls toward W0)
    A  = H + rho I            (one Cholesky factorisation per layer)
    for t < iterations:
        if t < mask_iterations:  M = select_mask(|V + U|, s_t)   (s_t: cubic ramp or constant)
        Z = (V + U) * M
        U = U + V - Z
        V = A^-1 (B + rho (Z - U))
    W = ((V + U) * M / d)^T     dead input channels (G_jj = 0) set to zero

All maths in fp32 with TF32 off; the result is cast back to the weight's dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..masks import scheduled_sparsity, select_mask
from ._precision import full_fp32
from ._stacking import stack_layers

__all__ = ["admm_prune", "admm_prune_group"]

_EPS = 1e-8


def _cholesky_inverse(matrix: torch.Tensor, max_tries: int = 4) -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix through Cholesky, adding diagonal jitter on failure."""
    jitter = 0.0
    scale = float(matrix.diagonal().mean().clamp_min(_EPS))
    for attempt in range(max_tries):
        candidate = matrix
        if attempt:  # a jittered copy only when the plain factorisation failed
            candidate = matrix.clone()
            candidate.diagonal().add_(jitter)
        factor, info = torch.linalg.cholesky_ex(candidate)
        if int(info) == 0:
            if attempt:
                warnings.warn(
                    f"ADMM: the damped Gram matrix was not positive definite; added {jitter:.2e} to its diagonal. "
                    "Raise `dampening` if this happens often.",
                    stacklevel=3,
                )
            # potri: 2-3x faster than cholesky_solve against I on torch 2.13's CPU LAPACK (1 or 2 threads)
            return torch.cholesky_inverse(factor)
        jitter = scale * 10.0 ** (attempt - 3)
    raise torch.linalg.LinAlgError(
        "ADMM: the damped Gram matrix is not positive definite even with jitter (NaN or inf in the calibration "
        "activations?). Raise `dampening` or check the calibration data."
    )


def admm_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    schedule: str = "cubic",
    iterations: int = 20,
    mask_iterations: int = 15,
    rho: float = 1.0,
    dampening: float = 0.1,
    per_output: bool = False,
) -> torch.Tensor:
    """Prune one layer with ADMM and gradual mask selection.

    Args:
        weight: dense weights ``W0``, shape ``(out_features, in_features)``, any float dtype.
        gram: ``X^T X`` of the layer's calibration inputs, ``(in_features, in_features)``.
        sparsity: target fraction of zeros (for N:M, ``1 - N/M``).
        nm: ``(N, M)`` for an N:M mask, ``None`` for unstructured.
        schedule: ``"cubic"`` (paper) or ``"constant"`` (reference code, unstructured branch).
        iterations: ADMM iterations.
        mask_iterations: the first iterations, during which the mask is re-selected.
        rho: ADMM penalty.
        dampening: damping as a fraction of the mean diagonal of the preconditioned Gram.
        per_output: unstructured selection per output row instead of per layer.

    Returns:
        The pruned weights, same shape, dtype and device as ``weight``.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 16, generator=generator)
        >>> w = torch.randn(8, 16, generator=generator)
        >>> pruned = admm_prune(w, x.T @ x, sparsity=0.5)
        >>> int((pruned == 0).sum())
        64
    """
    return admm_prune_group(
        [weight], gram, [sparsity], nm, schedule, iterations, mask_iterations, rho, dampening, per_output
    )[0]


def admm_prune_group(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    sparsities: Sequence[float],
    nm: tuple[int, int] | None = None,
    schedule: str = "cubic",
    iterations: int = 20,
    mask_iterations: int = 15,
    rho: float = 1.0,
    dampening: float = 0.1,
    per_output: bool = False,
) -> list[torch.Tensor]:
    """Prune several layers that read the same input (q/k/v, gate/up) in one solve: one factorisation of the shared
    Gram, their rows stacked into every product, each layer's mask selected over its own rows at its own sparsity.
    Equal to one :func:`admm_prune` per layer (rows are independent in every step but the mask selection).

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 16, generator=generator)
        >>> q, k = torch.randn(8, 16, generator=generator), torch.randn(4, 16, generator=generator)
        >>> pq, pk = admm_prune_group([q, k], x.T @ x, [0.5, 0.75])
        >>> int((pq == 0).sum()), int((pk == 0).sum())
        (64, 48)
    """
    results, todo, segments = stack_layers(weights, sparsities)
    if not todo:
        return results  # type: ignore[return-value]
    with torch.no_grad(), full_fp32():
        device = weights[todo[0]].device
        g = gram.to(device=device, dtype=torch.float32)
        diag = g.diagonal()
        dead = diag <= 0
        d = diag.clamp_min(0).sqrt() + _EPS
        inv_d = d.reciprocal()
        h = torch.mul(g, inv_d[:, None]).mul_(inv_d[None, :])  # G^, unit diagonal (one temporary)
        h.diagonal().add_(dampening * float(h.diagonal().mean()))  # H = G^ + lambda I
        h.diagonal().add_(rho)  # A = H + rho I
        a_inv = _cholesky_inverse(h)
        del h
        # The paper's V lives in (in, out); we keep its transpose V^T = W0 D (out, in), so masks are selected in the
        # weight's own layout with no transposes, and every product is taken from the right (A is symmetric).
        # A^-1 B = A^-1 H V0 = A^-1 (A - rho I) V0 = V0 - rho A^-1 V0: one product, no copy of H kept.
        v0 = torch.cat([weights[i].detach().to(device=device, dtype=torch.float32) for i in todo]).mul_(d)
        a_inv_b = torch.addmm(v0, v0, a_inv, alpha=-rho)

        # Every buffer is allocated once: fresh layer-sized temporaries each iteration cost page faults that, on CPU,
        # took as long as the product itself. Per iteration: three element-wise passes, the mask, one addmm. The
        # complement of the mask is kept as 0/1 floats: a product with a bool tensor runs ~4x slower on CPU.
        v, u = v0, torch.zeros_like(v0)  # V starts at V0 and is overwritten in place (V0 is not needed again)
        vu, scores, rhs, drop = (torch.empty_like(v0) for _ in range(4))
        keep, pruned_mask = (torch.empty(v.shape, dtype=torch.bool, device=device) for _ in range(2))
        for t in range(iterations):
            torch.add(v, u, out=vu)
            if t < mask_iterations:
                torch.abs(vu, out=scores)
                for i, rows in zip(todo, segments, strict=True):
                    s_t = scheduled_sparsity(float(sparsities[i]), t, mask_iterations, schedule)
                    keep[rows] = select_mask(scores[rows], s_t, nm=nm, per_output=per_output)
                drop.copy_(torch.logical_not(keep, out=pruned_mask).view(torch.uint8))  # uint8 -> float is fast
            torch.mul(vu, drop, out=u)  # U + V - Z, with Z = (V + U) * M
            torch.add(vu, u, alpha=-2.0, out=rhs)  # Z - U, exactly
            torch.addmm(a_inv_b, rhs, a_inv, alpha=rho, out=v)  # V^T = (A^-1 (B + rho (Z - U)))^T
        pruned = torch.add(v, u, out=vu).mul_(keep).div_(d)
        pruned[:, dead] = 0.0
        if not bool(torch.isfinite(pruned.sum())):  # a NaN or inf anywhere makes the sum one (a pass, no mask)
            raise FloatingPointError("ADMM produced non-finite weights; check the calibration activations.")
        for i, rows in zip(todo, segments, strict=True):
            results[i] = pruned[rows].to(dtype=weights[i].dtype).contiguous()
    return results  # type: ignore[return-value]
