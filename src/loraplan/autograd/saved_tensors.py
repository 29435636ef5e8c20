"""What a backward pass keeps, less: three kinds of tensor that autograd saves are exact, cheap
functions of tensors it keeps anyway, and are recomputed from them in the backward pass instead.

- An activation's output, from its input. In a gated MLP, `act(gate(x)) * up(x)` keeps act's output
  for the product's backward, while act's own backward keeps its input (SiLU and GELU do); in a plain
  MLP the next Linear keeps it for its weight's gradient. Recomputed by the activation's forward.
- A product of two tensors that are kept (or recomputed): the gated MLP's `act(gate(x)) * up(x)`,
  which the down projection keeps for its weight's gradient, while the product's own backward keeps
  both factors. Recomputed by one multiplication.
- The fp32 upcast inside an RMSNorm: `x.to(float32)` is saved (for the mean of squares and the
  product by the inverse root) where x, half its size, would do. x is kept instead and upcast again.

A recomputed tensor is made once for all the nodes that saved it (or views of it), by the first to
need it, and freed with the last. The gradients are bitwise the same: each recomputation is the same
operation on the same tensors. A layer that gradient checkpointing recomputes saves nothing here
(its own hooks are innermost), so it is unaffected.

Used by the probe (probing/passes.py), whose passes run forward and backward over long batches while its
statistics take most of the memory. The hooks are Python, so they cost most where the passes are
short and the host sets the pace (small models). What they save and cost, and why the norms' outputs
are not recomputed too, is measured by benchmarks/probe/saved_tensors.py (benchmarks/probe/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import weakref

# parameter-free, pointwise, deterministic: recomputing one from its input gives the same tensor
_POINTWISE = ("SiLU", "GELU", "ReLU", "Tanh", "Sigmoid", "Mish", "SiLUActivation", "GELUActivation",
              "NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "QuickGELUActivation",
              "AccurateGELUActivation")


class _Recompute:
    """What a saved tensor is packed into: how to make it again from tensors autograd keeps anyway.
    Made once per tensor and shared by every node that saved it (or a view of it: _View); the first
    node to need it computes it, and it is freed with the last of them. `layout`: (size, stride) of
    the original, which the recomputed tensor is given if it differs (views are taken of it). A
    tensor it is made from that was changed in place since is an error, as autograd's own are."""

    __slots__ = ("fn", "source", "layout", "versions", "value", "__weakref__")

    def __init__(self, fn, source, layout=None):
        self.fn, self.source, self.layout, self.value = fn, source, layout, None
        tensors = source if fn is _product else [source]
        self.versions = [(t, t._version) for t in tensors if not isinstance(t, _Recompute)]

    def __call__(self):
        import torch

        if self.value is None:
            if any(t._version != version for t, version in self.versions):
                raise RuntimeError("a tensor that lean_saved_tensors recomputes a saved tensor from was modified by an "
                                   "in-place operation after it was saved; run without lean_saved_tensors")
            with torch.no_grad():
                value = self.fn(self.source)
                if self.layout is not None and (value.size(), value.stride()) != self.layout:
                    value = torch.empty_strided(*self.layout, dtype=value.dtype, device=value.device).copy_(value)
            self.value = value
        return self.value


class _Entry:
    """A tensor of this forward pass that was saved or may be: `how` makes it again, (fn, source) with
    `source` a weak reference (a list of factor entries for _product), or None if it is kept as it is."""

    __slots__ = ("tensor", "how", "layout", "shared")

    def __init__(self, t, how=None):
        self.tensor, self.how, self.shared = weakref.ref(t), how, None
        self.layout = (t.size(), t.stride()) if how is not None else None  # kept tensors: no work on the hot path

    def recompute(self) -> _Recompute | None:
        """The shared recomputation, made now if not yet (held weakly here: it lives as long as a saved
        node holds it); None if kept as it is, or if what it is made from is gone."""
        shared = self.shared() if self.shared is not None else None
        if shared is not None or self.how is None:
            return shared
        fn, source = self.how
        if fn is _product:
            source = [f.tensor() if f.how is None else f.recompute() for f in source]
            if any(v is None for v in source):
                return None
        else:
            source = source()
            if source is None:
                return None
        shared = _Recompute(fn, source, self.layout)
        self.shared = weakref.ref(shared)
        return shared


class _View:
    """A saved view of a recomputed tensor (a Linear saves its 3-D input flattened to 2-D)."""

    __slots__ = ("base", "size", "stride", "offset")

    def __init__(self, base: _Recompute, view, original):
        self.base = base
        self.size, self.stride = view.size(), view.stride()
        self.offset = view.storage_offset() - original.storage_offset()

    def __call__(self):
        value = self.base()
        return value.as_strided(self.size, self.stride, value.storage_offset() + self.offset)


def _kind(module) -> str | None:
    """'activation' (its output is recomputed from its input), 'norm' (an RMSNorm: its fp32 upcast
    is), or None."""
    name = type(module).__name__
    if not type(module).__module__.startswith(("torch.nn", "transformers")):
        return None
    if name in _POINTWISE and not getattr(module, "inplace", False) and next(module.parameters(), None) is None:
        return "activation"
    if name.endswith("RMSNorm"):
        return "norm"
    return None


def _upcast(x):
    import torch

    return x.to(torch.float32)


def _product(operands):
    """a * b, in the order they were multiplied, each recomputed if it is itself recomputed."""
    import torch

    a, b = (x() if isinstance(x, _Recompute) else x for x in operands)
    return torch.mul(a, b)


@contextlib.contextmanager
def lean_saved_tensors(net):
    """Within the context, forward passes of `net` save less for their backward pass (see above)."""
    import torch

    made: dict = {}  # id(tensor) -> its _Entry, for this forward pass's tensors
    # (id(autograd node), output_nr) -> (the node, the entry) for the tensors saved so far, which a product's
    # factors are found by (the node is held, so its id is not reused while it is in the table)
    edges: dict = {}
    norms: list = []  # the inputs of the RMSNorms whose forward is running (innermost last)

    def start(module, args):
        made.clear()
        edges.clear()
        norms.clear()

    def enter(module, args):
        norms.append(args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None)

    def leave(module, args, output):
        norms.pop()

    def activation(module, args, kwargs, out):
        if (torch.is_grad_enabled() and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                and isinstance(out, torch.Tensor) and out.requires_grad and out is not args[0]):
            made[id(out)] = _Entry(out, (module.forward, weakref.ref(args[0])))

    def recipe(t, node) -> _Entry | None:
        """A new entry for t if it is an upcast or a product that can be recomputed, else None."""
        name = type(node).__name__
        x = norms[-1] if norms else None
        if (name == "ToCopyBackward0" and x is not None and t.dtype == torch.float32
                and x.dtype in (torch.bfloat16, torch.float16) and t.shape == x.shape and x.grad_fn is not None
                and node.next_functions[0] == (x.grad_fn, x.output_nr)):
            return _Entry(t, (_upcast, weakref.ref(x)))
        if name == "MulBackward0" and t._version == 0:
            factors = [_factor(edges, n, nr) for n, nr in node.next_functions]
            if all(f is not None and (f.how is not None or f.tensor() is not None) for f in factors):
                return _Entry(t, (_product, factors))
        return None

    def pack(t):
        base = t._base if t._base is not None else t
        node = base.grad_fn
        if node is None:  # a weight, or a tensor no gradient flows through: nothing to recompute it from
            return t
        entry = made.get(id(base))
        if entry is None or entry.tensor() is not base:
            entry = made[id(base)] = recipe(base, node) or _Entry(base)
        shared = entry.recompute()
        edges[id(node), base.output_nr] = (node, entry)
        if shared is None:
            return t
        return shared if base is t else _View(shared, t, base)

    def unpack(saved):
        return saved() if isinstance(saved, (_Recompute, _View)) else saved

    handles = [net.register_forward_pre_hook(start)]
    for m in net.modules():
        kind = _kind(m)
        if kind == "activation":
            handles.append(m.register_forward_hook(activation, with_kwargs=True))
        elif kind == "norm":
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for h in handles:
            h.remove()
        made.clear()
        edges.clear()
        norms.clear()


def _factor(edges: dict, node, nr: int) -> _Entry | None:
    """The entry of the tensor saved so far that is output `nr` of autograd node `node`, or None."""
    found = edges.get((id(node), nr)) if node is not None else None
    return found[1] if found is not None and found[0] is node else None
