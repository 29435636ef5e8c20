"""The statistics one pass gathers per module: its two Kronecker factors (K-FAC; Martens & Grosse
2015), A = E[x xᵀ] over its inputs and S = E[δ δᵀ] over the gradients at its outputs, from forward
and backward hooks, and its weight gradient summed over each fold of the batches.

Factors are sums over the real tokens (padding excluded), from half-precision products with fp32
sums on a GPU, kept in half their space (symmetric). Modules reading the same input (q/k/v,
gate/up) share one input factor. Factors wider than DENSE_MAX keep only their diagonal: a
per-channel whitening, which is not equivalent and is not what the planted tasks validate
(benchmarks/probe/RESULTS.md, DENSE_MAX). Each fold's gradient is summed by autograd in the
weights' dtype.
"""

from __future__ import annotations

import weakref

FOLDS = 2  # contiguous folds of the batches: their independent gradients give the noise estimate
DENSE_MAX = 8192  # wider factors are kept as their diagonal


class _Moment:
    """E[x xᵀ] of a stream of row vectors, summed in fp32: up to DENSE_MAX wide, the symmetric matrix
    in half its space; beyond, its diagonal (a 14336-wide matrix would be 0.8 GB per module).
    Halves h = ⌊n/2⌋ and k = n - h of x: the block below the diagonal, Σ x₂ᵀx₁ (k × h), is kept
    whole; the two diagonal blocks, symmetric, share a (k + 1) × k matrix: x₁ᵀx₁'s lower triangle one
    row down, x₂ᵀx₂'s upper triangle (the layout of LAPACK's rectangular full packed format). Three
    products of a quarter of n² each, where the whole matrix is one product of n² (a fourth of its
    flops saved); each diagonal block passes through a temporary of its size. `dense()` unpacks."""

    def __init__(self):
        self.matrix = None  # the packed matrix, or the diagonal
        self.width = 0
        self.n = 0
        self.batch = -1  # the last batch added

    def add(self, x, batch: int, real=None):
        """Adds batch `batch`'s rows, once: a checkpointed layer runs its forward (and hooks) twice.
        `real` = (positions, index): when x has a row per position of the padded batch, only the rows
        of real tokens count."""
        import torch

        if batch == self.batch:
            return
        self.batch = batch
        x = x.reshape(-1, x.shape[-1])
        if real is not None and x.shape[0] == real[0]:
            x = x.index_select(0, real[1])
        self.n += x.shape[0]
        self.width = n = x.shape[1]
        if self.diagonal:  # Σ x², summed in fp32 without an fp32 copy of x
            update = torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square_()
            self.matrix = update if self.matrix is None else self.matrix.add_(update)
            return
        if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
            x = x.float()  # once, where the product will not take x as it is
        if self.matrix is None:
            self.matrix = torch.zeros(_packed_entries(n), dtype=torch.float32, device=x.device)
        below, shared = self._blocks()
        h = n // 2
        x1, x2 = x[:, :h], x[:, h:]
        _mm32(x2.T, x1, below)
        shared[1:h + 1, :h].add_(_mm32(x1.T, x1).tril_())
        shared[:n - h].add_(_mm32(x2.T, x2).triu_())

    @property
    def diagonal(self) -> bool:
        return self.width > DENSE_MAX

    def _blocks(self):
        """Views of the packed matrix: the block below the diagonal, the shared diagonal blocks."""
        n = self.width
        h, k = n // 2, n - n // 2
        return self.matrix[:k * h].view(k, h), self.matrix[k * h:].view(k + 1, k)

    def dense(self):
        """The factor in float64: the diagonal, or the whole symmetric matrix."""
        import torch

        if self.diagonal:
            return self.matrix.double()
        n = self.width
        h = n // 2
        below, shared = self._blocks()
        f = torch.empty(n, n, dtype=torch.float64, device=self.matrix.device)
        f[h:, :h] = below
        f[:h, h:] = below.T
        for block, triangle in ((f[:h, :h], shared[1:h + 1, :h].tril()), (f[h:, h:], shared[:n - h].triu())):
            torch.add(triangle, triangle.T, out=block)  # T + Tᵀ counts the diagonal twice
            block.diagonal().sub_(triangle.diagonal())
        return f


def _packed_entries(n: int) -> int:
    """Entries of a packed n × n symmetric matrix (_Moment): n(n + 1)/2, and n/2 more for an odd n."""
    h, k = n // 2, n - n // 2
    return k * h + (k + 1) * k


def _factor_bytes(dim: int, packed: bool = True) -> int:
    """fp32 bytes of a dim-wide factor: packed (a _Moment's) or whole (a whitening matrix); its
    diagonal beyond DENSE_MAX."""
    if dim > DENSE_MAX:
        return 4 * dim
    return 4 * (_packed_entries(dim) if packed else dim * dim)


def _mm32(a, b, into=None):
    """a @ b with fp32 sums (in a's precision when that is wider), added in place to `into` when
    given: half-precision inputs multiply on the tensor cores without an fp32 copy (the products of
    bf16/fp16 numbers are exact in fp32; only the sums round)."""
    import torch

    if a.dtype in (torch.bfloat16, torch.float16):
        if a.is_cuda:
            try:
                if into is None:
                    return torch.mm(a, b, out_dtype=torch.float32)
                return torch.addmm(into, a, b, out_dtype=torch.float32, out=into)
            except (TypeError, RuntimeError):  # torch < 2.8: no out_dtype
                pass
        a, b = a.float(), b.float()
    return a @ b if into is None else into.addmm_(a, b)


class _SharedInputs:
    """Modules that read the same tensor object (q/k/v, gate/up) share one input factor: the first
    module to see a tensor adds it to its moment, the others point at that moment. Tensors are told apart by identity, through
    weak references: a freed tensor's id or memory may be reused by the next layer's input. Also
    where the current batch's real tokens are (padding is left out of every factor)."""

    def __init__(self):
        self.seen: dict = {}  # id(tensor) -> (weak reference, _Moment), for the current batch
        self.batch = 0
        self.real = None  # (positions, index of the real ones) for a padded batch

    def start_batch(self, mb, width: int, device):
        """The flat positions of `mb`'s tokens in its right-padded (rows × width) tensors."""
        import torch

        lengths = [len(x) for x in mb.input_ids]
        if all(n == width for n in lengths):
            self.real = None
            return
        index = torch.cat([torch.arange(n) + i * width for i, n in enumerate(lengths)])
        self.real = (len(lengths) * width, index.to(device, non_blocking=True))

    def read(self, x, own: _Moment | None) -> _Moment:
        entry = self.seen.get(id(x))
        if entry is not None and entry[0]() is x:
            return entry[1]
        moment = own or _Moment()
        moment.add(x.detach(), self.batch, self.real)
        self.seen[id(x)] = (weakref.ref(x), moment)
        return moment

    def end_batch(self):
        self.seen = {}
        self.batch += 1


class _Stats:
    """Per module: its input factor (perhaps shared), the second moment of the gradients at its
    outputs (the K-FAC factors), and the summed weight gradient of each fold."""

    def __init__(self, module, transposed: bool, inputs: _SharedInputs):
        self.module = module
        self.transposed = transposed  # transformers Conv1D stores the weight as (in, out)
        self.inputs = inputs
        self.input: _Moment | None = None
        self.output = _Moment()
        self.folds: list = [None] * FOLDS
        self.hook = None

    def attach(self):
        self.module.weight.requires_grad_(True)
        self.hook = self.module.register_forward_hook(self._forward)

    def detach(self):
        if self.hook is not None:
            self.hook.remove()
        self.module.weight.requires_grad_(False)
        self.module.weight.grad = None

    def _forward(self, module, inputs, output):
        import torch

        if not torch.is_grad_enabled():
            return
        self.input = self.inputs.read(inputs[0], self.input)
        output.register_hook(self._backward)

    def _backward(self, grad):
        self.output.add(grad.detach(), self.inputs.batch, self.inputs.real)

    def end_fold(self, fold: int):
        """The weight's .grad holds the sum over the fold's batches: keep it, start the next from zero."""
        grad = self.module.weight.grad
        self.module.weight.grad = None
        if grad is not None:
            self.folds[fold] = grad.detach().T if self.transposed else grad.detach()
