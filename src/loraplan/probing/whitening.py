"""Whitening a module's gradient by its Kronecker factors: W with WᵀW = (F + λI)^-1 for each factor F,
damped by DAMPING of its mean eigenvalue, so that M = W_S · G · W_Aᵀ is the gradient in the metric of
the model's predictions (its natural-gradient energy ½‖M‖² compares across modules of any shape).

W is the inverse Cholesky factor, not the symmetric F^-1/2 of an eigendecomposition: they differ by a
rotation, which changes neither ⟨M₁, M₂⟩ nor the spectra, and a Cholesky factor is far cheaper. It is
inverted by blocks with TF32 merges on a GPU, or applied by triangular solves when it whitens few
vectors; bf16/fp16 folds are whitened by a bf16 W, rounded once. A layer's factorizations run on a
side stream while the previous layer's products run, so nothing waits on the GPU inside a layer.
"""

from __future__ import annotations

import math

from .statistics import _mm32, _Moment

DAMPING = 1e-2  # Tikhonov damping of each Kronecker factor, relative to its mean eigenvalue
INVERSE_BLOCK = 128  # triangular inverses: diagonal blocks at most this wide, merged by float64 products


class _Whitener:
    """Applies W with WᵀW = (F + λI)^-1, F a Kronecker factor, λ = DAMPING × its mean eigenvalue:
    W = L⁻¹ for the Cholesky factor L of a full F (float64), (diag F + λ)^-1/2 for a diagonal one.
    Any such W gives the same ⟨M₁, M₂⟩ and the same distribution of sketched spectra as the symmetric
    F^-1/2 — they differ by a rotation — and a Cholesky factor is many times cheaper than an
    eigendecomposition. Applied to `columns` vectors in all, it is inverted once (n³/3 float64 flops)
    and applied as a tensor-core product when they are at least a third of its width, or else applied
    by a float64 triangular solve (n² flops a vector). `half`: the inverse is kept in bf16, for
    half-precision gradients — W rounded once, shared by both folds: the metric F moves by the
    rounding (2⁻⁹ of W), not the noise, so ⟨M₁, M₂⟩ stays an unbiased estimate for it.
    The factorization is not waited for: `info` says (later, see _repair) whether F + λI was
    positive definite in float64 rounding; `boost` multiplies λ for a second try. `factor`: a
    _Moment, or the sum S itself (n × n, or its diagonal)."""

    def __init__(self, factor, n: int, columns: int = 0, boost: float = 1.0, half: bool = False):
        import torch

        self.factor, self.n, self.columns, self.half = factor, n, columns, half
        self.diagonal = self.cholesky = self.inverse = self.info = None
        # float64, a copy of its own (changed in place below)
        f = factor.dense() if isinstance(factor, _Moment) else factor.to(torch.float64, copy=True)
        if f.dim() == 1:
            f.div_(max(n, 1)).clamp_min_(0)
            self.diagonal = (f + _damping(f.mean())).rsqrt().float()
            return
        # F + λI = (S + nλI)/n for the sum S of n outer products: S + nλI is factored (nλ is the same
        # DAMPING of S's own mean eigenvalue), and √n goes into W (one float64 copy of S in all)
        f.diagonal().add_(boost * _damping(f.diagonal().clamp_min(0).mean()))
        self.width = f.shape[0]
        lower, self.info = torch.linalg.cholesky_ex(f)
        del f
        scale = math.sqrt(max(n, 1))
        if 3 * columns >= lower.shape[0]:
            # on a GPU the merges run in TF32: ‖W F Wᵀ - I‖ ~ 4e-4, 20× below what rounding W to bf16 does
            inverse = _lower_inverse(lower, merge=torch.float32 if lower.is_cuda else None)
            dtype = torch.bfloat16 if half else torch.float32
            self.inverse = torch.mul(inverse, scale, out=torch.empty_like(inverse, dtype=dtype))
        else:
            self.cholesky = lower.div_(scale)

    def left(self, g, inplace: bool = False):
        """W · g (`inplace`: a diagonal W may overwrite g). A bf16 inverse takes g in bf16 (rounded
        here if it is not) and gives fp32 sums. Every path gives a row-major result."""
        import torch

        if self.diagonal is not None:
            return g.mul_(self.diagonal[:, None]) if inplace else self.diagonal[:, None] * g
        if self.inverse is not None:
            if self.half:
                return _mm32(self.inverse, g.to(torch.bfloat16))
            return self.inverse @ g
        return self._solve(g, left=True)

    def right(self, g, inplace: bool = False):
        """g · Wᵀ"""
        import torch

        if self.diagonal is not None:
            return g.mul_(self.diagonal) if inplace else g * self.diagonal
        if self.inverse is not None:
            if self.half:
                return _mm32(g.to(torch.bfloat16), self.inverse.T)
            return g @ self.inverse.T  # contiguous, as g is
        return self._solve(g, left=False)

    def _solve(self, g, left: bool):
        """L⁻¹g (left) or gL⁻ᵀ by a float64 triangular solve, back in fp32 and row-major (a solve's
        result is column-major: as it is, it broke the views of the folds in _signal)."""
        import torch

        a = self.cholesky if left else self.cholesky.mT
        x = torch.linalg.solve_triangular(a, g.double(), upper=not left, left=left)
        return x.to(torch.float32, memory_format=torch.contiguous_format)

    def record_stream(self, stream):
        """Built on one CUDA stream, used on `stream`: its memory waits for that stream's use."""
        for t in (self.diagonal, self.cholesky, self.inverse):
            if t is not None:
                t.record_stream(stream)


class _Factorizer:
    """Builds a layer's whiteners. On a GPU it does so on a side stream, one layer ahead, so that the
    main stream never waits for the host between layers; the host waits for that stream alone, never
    for the products. (The two streams share the GPU: the float64 factorizations and the products
    take about the sum of their times together, so more factorization streams gain nothing.)"""

    def __init__(self, device, half: bool = False):
        import torch

        self.stream, self.half = None, half
        if device.type == "cuda":
            self.main = torch.cuda.current_stream(device)
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(self.main)  # the factors are complete

    def start(self, factors: list):
        """Starts the whiteners of `factors` [(moment, columns)]: a ticket for `finish`."""
        import torch

        def build() -> dict:
            return {id(moment): _Whitener(moment, moment.n, columns, half=self.half)
                    for moment, columns in factors}

        if self.stream is None:
            return build(), None, None
        with torch.cuda.stream(self.stream):
            whiteners = build()
            dense = [w.info for w in whiteners.values() if w.info is not None]
            infos = torch.empty(len(dense), dtype=torch.int32, pin_memory=True)
            if dense:
                infos.copy_(torch.stack(dense), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return whiteners, infos, done

    def finish(self, ticket) -> dict:
        """The whiteners, ready for use on the current stream (a failed factorization redone)."""
        whiteners, infos, done = ticket
        if done is None:
            _repair(whiteners)
            return whiteners
        done.synchronize()
        self.main.wait_event(done)
        for w in whiteners.values():
            w.record_stream(self.main)
        _repair(whiteners, infos.tolist())
        return whiteners


def _damping(mean):
    """λ for a factor of mean eigenvalue `mean`; never 0 (a factor of all zeros: an unused module)."""
    return DAMPING * mean + 1e-20


def _repair(whiteners: dict, infos: list[int] | None = None) -> None:
    """Redoes any factor that was not positive definite in float64 rounding, with 11× the damping.
    `infos`: the factorizations' status, in order, if already on the host (else one wait here)."""
    import torch

    dense = [(k, w) for k, w in whiteners.items() if w.info is not None]
    if not dense:
        return
    if infos is None:
        infos = torch.stack([w.info for _, w in dense]).tolist()
    for (key, w), failed in zip(dense, infos, strict=True):
        if failed:
            again = _Whitener(w.factor, w.n, w.columns, boost=11.0, half=w.half)
            if int(again.info):
                raise RuntimeError(f"a probe factor is not positive definite even damped (width {w.width})")
            whiteners[key] = again


def _lower_inverse(lower, block: int = INVERSE_BLOCK, merge=None):
    """L⁻¹ of a lower-triangular L, bottom up: the diagonal blocks (at most `block` wide) are inverted
    by one batched triangular solve, then the inverted blocks are merged in pairs, [[A, 0], [B, C]]⁻¹
    = [[A⁻¹, 0], [-C⁻¹BA⁻¹, C⁻¹]], every pair of a level by the same two batched products: a few dozen
    kernels in all, where a triangular solve of the whole runs hundreds of small ones. `merge`: the
    dtype of the merges' products and of the result (default L's); the diagonal blocks are always
    inverted in L's. L is padded with an identity to blocks × 2^levels (fewer than 2^levels extra
    rows). A column-major L (what Cholesky returns) is inverted as the row-major upper-triangular Lᵀ
    that its storage holds, and L⁻¹ comes back column-major, as the transpose of (Lᵀ)⁻¹: no copy
    either way."""
    import torch

    n = lower.shape[0]
    levels = math.ceil(math.log2(n / block)) if n > block else 0
    size = -(-n // (1 << levels))  # the diagonal blocks' width
    total = size << levels
    upper = total == n and not lower.is_contiguous() and lower.mT.is_contiguous()
    if upper:
        t = lower.mT
    elif total == n:
        t = lower.contiguous()  # the views below assume row-major storage
    else:
        t = torch.eye(total, dtype=lower.dtype, device=lower.device)
        t[:n, :n] = lower
    out = torch.zeros_like(t, dtype=merge or t.dtype)

    def blocks(x, width: int, off: bool, step: int):
        """Views of x's diagonal blocks of `width` (`off`: the blocks beside them, below for a lower
        x, above for an upper one), every `step`-th."""
        stride = width * (total + 1) * step
        offset = x.storage_offset() + ((width if upper else width * total) if off else 0)
        return x.as_strided((total // (width * step), width, width), (stride, total, 1), offset)

    blocks(out, size, False, 1).copy_(torch.linalg.solve_triangular(
        blocks(t, size, False, 1), torch.eye(size, dtype=lower.dtype, device=lower.device), upper=upper))
    t = t.to(out.dtype)  # a copy only when the merges are in another dtype
    width = size
    while width < total:
        inverses, beside = blocks(out, width, False, 1), blocks(t, width, True, 2)
        a, c = inverses[0::2], inverses[1::2]  # [[A, B], [0, C]]⁻¹ has -A⁻¹BC⁻¹ above for an upper t
        torch.neg(a @ (beside @ c) if upper else c @ (beside @ a), out=blocks(out, width, True, 2))
        width *= 2
    if upper:
        out = out.mT
    return out if total == n else out[:n, :n]
