"""From whitened folds to a module's signal, noise and rank.

The batches' two folds give independent whitened gradients M₁, M₂. ⟨M₁, M₂⟩ estimates ‖E[M]‖²
without the noise energy that inflates ‖M‖² (more for bigger matrices); their cross-Gram C estimates
the spectrum the same way, and its most negative eigenvalue gives the noise floor below which
directions are not counted; the rank is the number of directions holding ENERGY of what lies above.
C is formed once per module (one product, as small as the weight's smaller side). Up to EXACT_MAX
columns it is decomposed exactly; beyond, from the Ritz values of a 256-column subspace: SKETCH
columns of subspace iteration (Halko, Martinsson & Tropp 2011), which resolve the top of the
spectrum, extended by a block Krylov space (Musco & Musco 2015), which reaches the floor at the edge
of the dense noise bulk where subspace iteration does not (alone, either one misreads the floor or
the tail; a plain Gaussian compression ΩᵀCΩ spreads the eigenvalues: benchmarks/probe/RESULTS.md,
"Spectra of modules wider than 256 columns"). The Ritz steps of every C of the same width run batched
at the end of a pass, and their eigenvalues are taken on the CPU by a pool of threads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .result import ENERGY, ModuleSignal
from .statistics import FOLDS, _mm32, _Stats
from .whitening import _Whitener

SKETCH = 128  # columns resolving the top of a wide module's spectrum (subspace iteration)
POWER = 1  # its power steps
KRYLOV_BLOCK = 16  # columns of each block of the Krylov space that extends it to the spectrum's ends
KRYLOV_STEPS = 8  # its blocks: SKETCH + 128 Ritz values in all
EXACT_MAX = 256  # up to this many columns the cross-Gram is exact (its eigendecomposition is cheap)
RITZ_BYTES = 1 << 30  # cross-Grams in one batch of Ritz steps (all fold gradients are freed by then)


@dataclass
class _Pending:
    """A module's signal still on the device: ⟨M₁, M₂⟩, ‖M̄‖² and the cross-Gram C (fp32)."""

    info: object
    signal: object = None
    naive: object = None
    cross: object = None


def _signal(info, stats: _Stats, input_whitener: _Whitener | None, output_whitener: _Whitener | None) -> _Pending:
    """M = W_S · G · W_Aᵀ for both folds at once, laid out (out, FOLDS, in): the output side whitens
    an (out × FOLDS·in) matrix and the input side a (FOLDS·out × in) one, two plain products. Folds
    summed in half precision are whitened in bf16 on the tensor cores (fp32 sums): each product's
    rounding belongs to one fold, like the folds' own, and only adds noise that the cross product
    cancels; the whitening matrices are rounded once (see _Whitener)."""
    import torch

    if input_whitener is None or output_whitener is None or any(f is None for f in stats.folds):
        return _Pending(info)
    out, inp = stats.folds[0].shape
    half = stats.folds[0].dtype in (torch.bfloat16, torch.float16)
    m = torch.stack(stats.folds, dim=1)  # one copy, in the folds' precision
    m = m.to(torch.bfloat16) if half else m.float()
    m = output_whitener.left(m.view(out, FOLDS * inp), inplace=True)
    if half:
        m = m.to(torch.bfloat16)
    m = input_whitener.right(m.view(out * FOLDS, inp), inplace=True).view(out, FOLDS, inp)
    both = torch.linalg.vector_norm(m, dtype=torch.float32).square()  # ‖M₁‖² + ‖M₂‖²
    if half:
        m = m.to(torch.bfloat16)
    m1, m2 = m[:, 0], m[:, 1]
    if out < inp:  # the spectrum lives on the smaller side
        m1, m2 = m1.T, m2.T
    cross = _cross(m1, m2)
    del m, m1, m2
    signal = cross.diagonal().sum()  # ⟨M₁, M₂⟩ = tr(M₁ᵀM₂) = tr C
    return _Pending(info, signal, (both + 2 * signal) / 4, cross)  # naive: ‖(M₁ + M₂)/2‖²


def _cross(m1, m2):
    """C = (M₁ᵀM₂ + M₂ᵀM₁)/2 for the tall folds M₁, M₂: one product, as small as the weight's smaller
    side, with fp32 sums. bf16 folds multiply on the tensor cores: rounded whitened folds (see
    _signal) add only noise, each fold's own, which the cross product cancels, and bias nothing."""
    x = _mm32(m1.T, m2)
    return (x + x.T).mul_(0.5)


def _spectrum_matrices(crosses: list, sketches: dict):
    """Matrices whose eigenvalues are those of the cross-Grams C (n × n, the same n for all), in
    stacked chunks: C itself up to EXACT_MAX columns, else QᵀCQ for an orthonormal Q whose first SKETCH
    columns span C's dominant eigenvectors (subspace iteration, POWER power steps) and whose
    KRYLOV_STEPS blocks of KRYLOV_BLOCK columns extend it by a block Krylov space [CΩ, C²Ω, …] (the
    spectrum's ends, the noise floor's edge among them). The Ritz steps run on a batch of C at once,
    RITZ_BYTES of them at a time, each batch yielded as it is enqueued; `crosses` is emptied as they go
    (each C is freed once used)."""
    import torch

    n, top = crosses[0].shape[0], SKETCH + KRYLOV_BLOCK * KRYLOV_STEPS
    if n <= EXACT_MAX or n <= top:
        out = torch.stack(crosses)
        crosses.clear()
        yield out
        return
    device, dtype = crosses[0].device, crosses[0].dtype
    key = (n, device, dtype)
    if key not in sketches:  # one Gaussian start per width, the same for every module
        generator = torch.Generator(device=device).manual_seed(0)
        sketches[key] = torch.randn(n, SKETCH + KRYLOV_BLOCK, generator=generator, device=device, dtype=dtype)
    start = sketches[key]
    chunk = max(1, RITZ_BYTES // (4 * n * (n + 5 * top)))  # the Cs and their Ritz work
    while crosses:
        c = torch.stack(crosses[:chunk])
        del crosses[:chunk]
        q = c.new_empty(c.shape[0], n, top)
        z = start[:, :SKETCH]
        for _ in range(POWER + 1):
            z = _orthonormal(c @ z)
        q[..., :SKETCH] = z
        z = start[:, SKETCH:]
        for end in range(SKETCH + KRYLOV_BLOCK, top + 1, KRYLOV_BLOCK):
            z, done = c @ z, q[..., :end - KRYLOV_BLOCK]
            for _ in range(2):  # block Gram-Schmidt against the columns so far, twice for orthogonality
                z = z - done @ (done.transpose(1, 2) @ z)
            z = q[..., end - KRYLOV_BLOCK:end] = _orthonormal(z)
        ritz = q.transpose(1, 2) @ (c @ q)
        del c
        yield (ritz + ritz.transpose(1, 2)) / 2


def _orthonormal(y):
    """Orthonormal bases of the columns of y (..., n, k) by CholeskyQR in float64 (three batched
    kernels, no Householder sweep); a tiny ridge keeps them defined when C has fewer directions than
    y has columns."""
    import torch

    y = y.double()
    gram = y.transpose(-1, -2) @ y
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(1e-12 * diagonal.mean(-1, keepdim=True) + 1e-300)
    lower = torch.linalg.cholesky_ex(gram).L
    return torch.linalg.solve_triangular(lower, y.transpose(-1, -2), upper=False).transpose(-1, -2).float()


def _finish(pending: list[_Pending]) -> dict[str, ModuleSignal]:
    """Brings a pass's results back at once: the spectra's matrices batched by size, their
    eigenvalues on the CPU (on a GPU, while the next batch's Ritz steps run)."""
    import torch

    out = {p.info.name: ModuleSignal(p.info.name, p.info.role, p.info.layer, 0.0, 0.0, 0, [])
           for p in pending if p.cross is None}
    live = [p for p in pending if p.cross is not None]
    if not live:
        return out
    scalars = torch.stack([torch.stack([p.signal, p.naive]) for p in live]).double().cpu().tolist()
    spectra, sketches, sizes = {}, {}, [p.cross.shape[0] for p in live]
    with _Eigenvalues() as eigenvalues:
        for size in dict.fromkeys(sizes):
            same = [i for i, n in enumerate(sizes) if n == size]
            crosses = [live[i].cross for i in same]
            for i in same:
                live[i].cross = None
            for matrices in _spectrum_matrices(crosses, sketches):
                eigenvalues.add(same[:len(matrices)], matrices)
                del same[:len(matrices)]
        for index, values in eigenvalues.results():
            spectra.update(zip(index, zip(*_ranks(values), strict=True), strict=True))
    for i, p in enumerate(live):
        out[p.info.name] = ModuleSignal(p.info.name, p.info.role, p.info.layer, *scalars[i], *spectra[i])
    return out


class _Eigenvalues:
    """Eigenvalues, descending, of stacks of small symmetric matrices, labelled by an index list each,
    from a pool of CPU threads with one LAPACK thread each (many times faster on many small matrices
    than one at a time with every thread). From a GPU, each stack is copied to pinned memory without
    waiting and its matrices become tasks, one each, that wait for the copy: the GPU goes on with the
    next stack meanwhile. CPU stacks are decomposed at the end (the Ritz steps that made them wanted
    every thread, which the pool's one-thread setting would take away)."""

    def __enter__(self):
        import torch

        self.parts, self.pool, self.threads = [], None, torch.get_num_threads()
        self.quiet = contextlib.ExitStack()
        return self

    def _open(self):
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            from ..adapter.analyze import one_thread

            self.quiet.enter_context(one_thread())
            self.pool = self.quiet.enter_context(ThreadPoolExecutor(max(1, self.threads)))
        return self.pool

    def add(self, index: list, matrices) -> None:
        import torch

        if not matrices.is_cuda:
            self.parts.append((index, matrices))
            return
        pool = self._open()
        host = torch.empty(matrices.shape, dtype=matrices.dtype, pin_memory=True)
        host.copy_(matrices, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def decompose(k: int):
            copied.synchronize()
            return torch.linalg.eigvalsh(host[k:k + 1].double()).flip(-1)

        self.parts.extend(([i], pool.submit(decompose, k)) for k, i in enumerate(index))

    def results(self):
        """(index, eigenvalues) pairs, in the order added."""
        import torch

        for index, part in self.parts:
            if isinstance(part, torch.Tensor):
                chunks = part.double().chunk(min(self.threads, len(part)))
                yield index, torch.cat(list(self._open().map(torch.linalg.eigvalsh, chunks))).flip(-1)
            else:
                yield index, part.result()

    def __exit__(self, *exc):
        self.quiet.close()


def _ranks(values) -> tuple[list[int], list[list[float]]]:
    """For each row of cross-Gram eigenvalues (descending): the directions holding ENERGY of the
    signal, after the noise floor (the most negative eigenvalue's magnitude) is taken off each; and
    the top of that spectrum (at most 32 values)."""
    import torch

    floor = (-values.min(-1, keepdim=True).values).clamp_min(0)
    kept = (values - floor).clamp_min(0)
    total = kept.sum(-1, keepdim=True)
    ranks = torch.where(total[:, 0] > 0, (kept.cumsum(-1) / total < ENERGY).sum(-1) + 1, 0).tolist()
    tops = [[round(v, 8) for v in row if v > 0] for row in kept[:, :32].tolist()]
    return ranks, tops
