"""The fast engine: the PEFT engine's trials, with the step run without PEFT's per-token overheads.

PEFT still builds every adapter (same initialisation, parameter names, optimizer and files, so an
adapter loads with `PeftModel.from_pretrained`); what changes is how a step runs:
- each adapted Linear computes in the model's dtype, base(x) + s·(dropout(x)·Aᵀ)·Bᵀ with the last
  product and the sum in one `addmm`, where PEFT casts x to the adapter's fp32 and adds an fp32 product
  (copies and elementwise passes per module per layer);
- DoRA's row norms ‖W_i + s·B_i·A‖ come from the factors, ‖W_i‖² + 2s·B_i·(A·W_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ,
  where PEFT forms W + s·BA in fp32 (through an identity matrix) in every module at every step;
- no attention mask: batches are right-padded and attention is causal, so a real token never sees
  padding, and SDPA runs its flash kernel;
- nothing waits for the GPU inside a trial's steps: losses and gradient norms are read, and the
  divergence checks run, at each evaluation (on the CPU at every step, exactly as the PEFT engine);
- on CUDA, where the host rather than the GPU sets the pace (`graphs_pay`), each micro-batch's forward
  and backward replays a CUDA graph per batch shape, captured on first use: one launch instead of
  thousands of small kernels;
- evaluation runs several eval batches per forward.
The loss is the one transformers computes (fp32 logits, summed over the step's supervised tokens).
A trial it cannot run (quantized layers, a layer type other than Linear or Conv1D, a model that is
not a causal LM) runs on the PEFT engine's code, and `notes` says so.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field, replace

from ..data.batches import MicroBatch
from ..data.formats import IGNORE_INDEX
from .engine import PeftEngine, TrialState, grad_norm_message, inject_fault, record_train_loss
from .folder import EvalBatches, EvalPoint, TrialResult, TrialStatus
from .spec import TrainingSettings


@dataclass(frozen=True)
class FastOptions:
    """The engine's levers, each of which can be turned off to measure what it is worth
    (benchmarks/sweep/ab_fast.py)."""

    lean_lora: bool = True  # the model-dtype adapter path (off: PEFT's own forward)
    dora_factors: bool = True  # DoRA's norms from the factors (off: PEFT's DoRA forward)
    graphs: bool = True  # CUDA graphs per batch shape, where they pay (graphs_pay)
    graph_limit: float = 1.5e12  # ... for DoRA trials whose layer work per micro-batch is under this (FLOPs)
    graphs_all: bool = False  # graphs for every trial (to measure what they are worth where they do not pay)
    lazy: bool = True  # no wait for the GPU inside the steps (CUDA)
    flash: bool = True  # SDPA without cuDNN: no attention plan per shape, capturable
    causal_sdpa: bool = True  # attention by is_causal, no mask built (transformers builds one under capture)
    bucket: int = 64  # pad widths on CUDA to a multiple of this: few shapes, few graphs
    eval_tokens: int = 16384  # padded tokens per evaluation forward


def make_engine(choice: str, model: str, settings: TrainingSettings, *, trust_remote_code: bool = False,
                random_init: bool = False, options: FastOptions | None = None) -> PeftEngine:
    """The engine `--engine` asks for: `peft`; `fast`; `auto` = fast on a CUDA GPU, else PEFT."""
    import torch

    if choice == "peft" or (choice == "auto" and not torch.cuda.is_available()):
        return PeftEngine(model, settings, trust_remote_code=trust_remote_code, random_init=random_init)
    return FastEngine(model, settings, trust_remote_code=trust_remote_code, random_init=random_init, options=options)


@dataclass
class _Adapted:
    """One adapted Linear (PEFT's lora.Linear) of one adapter, as the fast forward reads it."""

    module: object
    base: object
    A: object  # lora_A weight (r × in), the adapter's dtype
    B: object  # lora_B weight (out × r)
    scale: float
    p: float  # dropout on the adapter's input
    magnitude: object = None  # DoRA's magnitude vector (out)
    weight_sq: object = None  # DoRA: ‖W_i‖² of the frozen base weight, fp32, computed once

    @property
    def weight(self):
        """The base weight as out × in (Conv1D stores it in × out)."""
        w = self.base.weight
        return w.t() if getattr(self.module, "fan_in_fan_out", False) else w


def _lora_forward(a: _Adapted, x, *args, **kwargs):
    import torch
    import torch.nn.functional as F

    y = a.base(x, *args, **kwargs)
    xd = F.dropout(x, a.p, True) if a.p and a.module.training else x
    h = F.linear(xd, a.A.to(x.dtype))
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), a.B.to(x.dtype).t(), alpha=a.scale)
    return out.view(y.shape)


def _dora_forward(a: _Adapted, x, *args, **kwargs):
    """PEFT's DoRA output, y + (c − 1)·base(x_d) + c·s·B·A·x_d with c = m / ‖W + s·BA‖ (the norm a
    constant, DoRA §4.3), x_d = dropout(x); without dropout (or in eval) base(x_d) is y less its bias."""
    import torch
    import torch.nn.functional as F

    y = a.base(x, *args, **kwargs)
    w = a.weight
    with torch.no_grad():
        norm = dora_row_norms(w, a.A, a.B, a.scale, a.weight_sq)
    c = a.magnitude / norm
    if a.p and a.module.training:
        xd = F.dropout(x, a.p, True)
        bd = F.linear(xd, w)
    else:
        xd, bias = x, a.base.bias
        bd = y if bias is None else y - bias
    h = F.linear(xd, a.A.to(x.dtype))
    scaled_b = ((c * a.scale)[:, None] * a.B).to(x.dtype)  # c·s folded into B's rows: out × r, not tokens × out
    out = torch.addcmul(y, (c - 1).to(x.dtype), bd)
    out = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), scaled_b.t())
    return out.view(y.shape)


def dora_row_norms(w, A, B, scale: float, w_sq=None):
    """‖W_i + s·B_i·A‖ for every row i of the out × in weight W, in fp32, without forming W + s·BA:
    ‖W_i‖² + 2s·B_i·(A·W_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ. One pass over W (W·Aᵀ, out × r) instead of PEFT's
    fp32 W + s·BA (and an in × in identity to make BA)."""

    if w_sq is None:
        w_sq = weight_row_norms_sq(w)
    acc = w_sq.dtype
    wa = (w @ A.to(w.dtype).t()).to(acc)
    b, a = B.to(acc), A.to(acc)
    sq = w_sq + (2 * scale) * (b * wa).sum(1) + (scale * scale) * ((b @ (a @ a.t())) * b).sum(1)
    return sq.clamp_min(0).sqrt()


CAUSAL_SDPA = "loraplan_causal_sdpa"


def causal_sdpa_usable(config) -> bool:
    """Whether attention may run by SDPA's is_causal alone, no mask: right-padded batches (a real
    token never attends to padding after it) on a plain SDPA model, no sliding window."""
    return (getattr(config, "_attn_implementation", None) == "sdpa" and not getattr(config, "sliding_window", None)
            and all(t == "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]))


@functools.cache
def _register_causal_sdpa() -> str:
    """transformers' SDPA attention with is_causal and no mask, and a mask function that builds none.
    Without it the mask is built under CUDA graph capture (transformers cannot tell there that the
    batch holds one sequence per row) and SDPA leaves its flash kernel for a masked one."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register(CAUSAL_SDPA, attention)
    AttentionMaskInterface.register(CAUSAL_SDPA, lambda *args, **kwargs: None)
    return CAUSAL_SDPA


def graphs_pay(params: int, layers: int, tokens: float, limit: float, dora: bool) -> bool:
    """Whether replaying CUDA graphs beats launching eagerly: only where the host, not the GPU, sets
    the pace. Measured on the H200 (benchmarks/sweep/RESULTS.md), Llama-3.2-1B at 8 × ~330 tokens
    (4·N/L·tokens = 8e11 FLOPs per layer): DoRA steps (about twice LoRA's kernels per layer) 1.21×
    faster with graphs; LoRA steps no faster (0.83-0.91× over 30 steps, captures included): the host
    and the GPU take about as long. At Llama-3.1-8B (2.6e12 per layer) a step is 208 ms of device time,
    well above what launching it takes, so a capture per batch shape would be cost without gain."""
    return dora and layers > 0 and 4 * params / layers * tokens < limit


def weight_row_norms_sq(w):
    """‖W_i‖² per row, accumulated in fp32 (or the weight's dtype when wider)."""
    import torch

    return torch.linalg.vector_norm(w, dim=1, dtype=torch.promote_types(w.dtype, torch.float32)).square()


def adapted_layers(net, adapter: str, options: FastOptions) -> tuple[list[_Adapted], str | None]:
    """The adapter's layers as the fast forward reads them, or why it cannot run them."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    layers = []
    for name, module in net.named_modules():
        if not isinstance(module, BaseTunerLayer) or not any(
                adapter in getattr(module, attr, {}) for attr in module.adapter_layer_names):
            continue
        if type(module) is not LoraLinear:
            where = type(module).__module__.removeprefix("peft.tuners.").removesuffix(".layer")
            return [], f"{where}.{type(module).__name__} layers ({name})"
        base = module.get_base_layer()
        if type(base) not in (nn.Linear, Conv1D):
            return [], f"{type(base).__name__} base layers ({name})"
        if module.lora_bias.get(adapter) or module.merged or module.disable_adapters:
            return [], f"a LoRA bias, a merged or a disabled adapter ({name})"
        variant = module.lora_variant.get(adapter)
        dora = variant is not None
        if dora and not (isinstance(variant, DoraLinearVariant) or variant is DoraLinearVariant):
            return [], f"the {type(variant).__name__} variant ({name})"
        if (dora and not options.dora_factors) or (not dora and not options.lean_lora):
            continue  # measured off: PEFT's forward for this layer
        dropout = module.lora_dropout[adapter]
        layers.append(_Adapted(module=module, base=base, A=module.lora_A[adapter].weight,
                               B=module.lora_B[adapter].weight, scale=float(module.scaling[adapter]),
                               p=float(getattr(dropout, "p", 0.0)) if isinstance(dropout, nn.Dropout) else 0.0,
                               magnitude=module.lora_magnitude_vector[adapter].weight if dora else None))
    return layers, None


def _install(layers: list[_Adapted]) -> None:
    for a in layers:
        if a.magnitude is not None and a.weight_sq is None:
            a.weight_sq = weight_row_norms_sq(a.weight.detach())
        a.module.forward = functools.partial(_dora_forward if a.magnitude is not None else _lora_forward, a)


def _uninstall(layers: list[_Adapted]) -> None:
    for a in layers:
        a.module.__dict__.pop("forward", None)


@dataclass
class _FastTrial:
    layers: list[_Adapted]
    pending: list = field(default_factory=list)  # steps not yet read back: (step, loss, grad norm, lr, tokens)
    graphs: dict = field(default_factory=dict)  # (rows, width) -> (graph, ids, targets, loss)
    pool: object = None  # the graphs' memory pool: the trial's own (a pool must not outlive its graphs' use)
    count: object = None  # the step's supervised tokens, on the device (an input of the graphs)
    since: float | None = None  # perf_counter when the training time not yet counted began
    use_graphs: bool = False


def padded_batch(mb: MicroBatch, pad_id: int, multiple: int):
    """Input ids (right-padded with pad_id) and next-token targets (IGNORE_INDEX on padding and on the
    last position), width rounded up to `multiple`."""
    import torch

    width = max(len(x) for x in mb.input_ids)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(mb.input_ids), width), pad_id, dtype=torch.long)
    targets = torch.full((len(mb.input_ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(zip(mb.input_ids, mb.labels, strict=True)):
        ids[i, : len(x)] = torch.tensor(x)
        targets[i, : len(y) - 1] = torch.tensor(y[1:])
    return ids, targets


class FastEngine(PeftEngine):
    name = "fast"

    def __init__(self, model: str, settings: TrainingSettings, *, trust_remote_code: bool = False,
                 random_init: bool = False, options: FastOptions | None = None):
        super().__init__(model, settings, trust_remote_code=trust_remote_code, random_init=random_init)
        self.options = options or FastOptions()
        self._fast: dict[str, _FastTrial] = {}
        self._active: str | None = None
        self._batches: dict[int, tuple] = {}  # id(MicroBatch) -> (the batch, ids, targets) on the device
        self._eval_plans: dict[int, tuple] = {}
        self._cannot: str | None = None  # why no trial can run fast
        self._graphs = self._lazy = False
        self._params = 0
        self._warm = False
        self._attn: tuple[str, str] | None = None  # (the model's attention, the fast trials')

    def load(self, pad_id: int) -> None:
        super().load(pad_id)
        cuda = self.device.type == "cuda"
        if cuda:
            self.pad_multiple = self.options.bucket
        self._cannot = self.blocker()
        if self._cannot:
            self.notes.append(f"the fast engine cannot run {self._cannot}: every trial ran on the PEFT engine")
        self._lazy = cuda and self.options.lazy
        config = self.base.config
        if self.options.causal_sdpa and causal_sdpa_usable(config):
            self._attn = (config._attn_implementation, _register_causal_sdpa())
        self._graphs = cuda and self._lazy and self.options.graphs and not self.settings.grad_ckpt
        self._params = sum(p.numel() for p in self.base.parameters())

    def blocker(self) -> str | None:
        """Why no trial of this sweep can run fast, or None."""
        if self.settings.quantization:
            return f"{self.settings.quantization} quantization (bitsandbytes layers)"
        if self.base is not None and not type(self.base).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            return f"{type(self.base).__name__} (not a causal LM)"
        return None

    # -- the engine's calls ---------------------------------------------------------------------------

    def start(self, trial, writer, training) -> TrialState:
        state = super().start(trial, writer, training)
        if state.status is not None or self._cannot:
            return state
        layers, reason = adapted_layers(self.base, trial.adapter_name, self.options)
        if reason:
            self.notes.append(f"{trial.name}: the fast engine cannot run {reason}; it ran on the PEFT engine")
            return state
        self._fast[trial.name] = _FastTrial(layers)
        return state

    def finish(self, state: TrialState, status: TrialStatus | None = None,
               message: str | None = None) -> TrialResult:
        ft = self._fast.get(state.name)
        if ft is not None and ft.pending and state.status is None:
            self._flush(state, ft)
        return super().finish(state, status, message)

    def close(self) -> None:
        self._activate(None)
        super().close()

    # -- steps ------------------------------------------------------------------------------------------

    def _advance_one(self, state, steps, until, eval_set, eval_every, progress) -> None:
        self._activate(state.name)
        ft = self._fast.get(state.name)
        if ft is None:
            return super()._advance_one(state, steps, until, eval_set, eval_every, progress)
        batches = self._to_device([mb for step in steps[state.step:until] for mb in step])
        if self._graphs and batches:
            tokens = sum(ids.numel() for _, ids, _ in batches) / len(batches)
            layers = getattr(self.base.config, "num_hidden_layers", 0) or 0
            dora = any(a.magnitude is not None for a in ft.layers)
            ft.use_graphs = self.options.graphs_all or graphs_pay(self._params, layers, tokens,
                                                                  self.options.graph_limit, dora)
            if ft.use_graphs:  # the graphs accumulate into these, in place
                for p in state.params:
                    if p.grad is None:
                        p.grad = p.detach().new_zeros(p.shape)
        self.base.train()
        with self._attention():
            super()._advance_one(state, steps, until, eval_set, eval_every, progress)

    def _train_step(self, state: TrialState, micro_batches: list[MicroBatch]) -> None:
        ft = self._fast.get(state.name)
        if ft is None:
            return super()._train_step(state, micro_batches)
        import torch

        t0 = time.perf_counter()
        if ft.since is None:
            ft.since = t0
        fault = inject_fault(state.name, state.step + 1)
        count = max(sum(mb.supervised for mb in micro_batches), 1)
        total = None
        for mb in micro_batches:
            _, ids, targets = self._batches[id(mb)] if id(mb) in self._batches else self._to_device([mb])[0]
            loss = self._forward_backward(ft, ids, targets, count, poison=fault == "nan")
            total = loss if total is None else total + loss
            state.tokens += mb.tokens
        state.step += 1
        norm = None
        if self.settings.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(state.params, self.settings.max_grad_norm)
        ft.pending.append((state.step, total, norm, state.optimizer.param_groups[0]["lr"], state.tokens))
        if not self._lazy:
            self._flush(state, ft)
            if state.status is not None:
                self._zero_grads(state, ft)
                return
        state.optimizer.step()
        state.scheduler.step()
        self._zero_grads(state, ft)

    def _zero_grads(self, state: TrialState, ft: _FastTrial) -> None:
        import torch

        if ft.use_graphs and self._graphs:  # the captured backward adds into these very tensors
            torch._foreach_zero_([p.grad for p in state.params])
        else:
            state.optimizer.zero_grad(set_to_none=True)

    def _flush(self, state: TrialState, ft: _FastTrial) -> None:
        """Read back the steps run since the last flush (one wait for the GPU), log them, and stop the
        trial at the first that diverged, as the PEFT engine would have at that step."""
        import torch

        if not ft.pending:
            return
        values = torch.stack([t for row in ft.pending for t in row[1:3] if t is not None]).tolist()
        now = time.perf_counter()
        state.train_seconds += now - ft.since
        ft.since = now
        rows, ft.pending = ft.pending, []
        last = state.step, state.tokens
        for step, _, norm, lr, tokens in rows:
            state.step, state.tokens = step, tokens
            loss = values.pop(0)
            norm = values.pop(0) if norm is not None else None
            record_train_loss(state, loss, lr)
            if state.status is None and norm is not None and not math.isfinite(norm):
                state.status, state.message = TrialStatus.DIVERGED, grad_norm_message(norm, step)
            if state.status is not None:
                return
        state.step, state.tokens = last

    def _forward_backward(self, ft: _FastTrial, ids, targets, count: int, poison: bool = False):
        """One micro-batch's loss (detached) with its gradients accumulated: a CUDA graph replay when
        graphs are on, else eager."""
        import torch

        if self._graphs and ft.use_graphs and not poison:
            try:
                return self._graph_step(ft, ids, targets, count)
            except RuntimeError as e:  # capture failed: eager from here on, and the output says why
                torch.cuda.set_stream(torch.cuda.default_stream())  # a failed capture can leave its stream current
                torch.cuda.synchronize()
                ft.graphs.clear()
                self._graphs = False
                self.notes.append(f"CUDA graphs off (capture failed: {str(e).splitlines()[0]}); steps ran eagerly")
        loss = self._loss(ids, targets, count)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        return loss.detach()

    def _loss(self, ids, targets, count):
        """transformers' causal-LM loss: fp32 logits, cross-entropy summed over the supervised tokens,
        divided by the step's count of them."""
        import torch.nn.functional as F

        logits = self.base(input_ids=ids).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss / count

    def _graph_step(self, ft: _FastTrial, ids, targets, count: int):
        import torch

        if ft.count is None:
            ft.count = torch.ones((), dtype=torch.float32, device=self.device)
        ft.count.fill_(count)
        if not self._warm:  # lazy initialisations (cuBLAS workspaces, kernels) outside any capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._loss(ids, targets, ft.count)
                loss.backward()
            torch.cuda.current_stream().wait_stream(side)
            self._warm = True
            return loss.detach()
        key = tuple(ids.shape)
        entry = ft.graphs.get(key)
        if entry is None:
            if ft.pool is None:  # shared by the trial's graphs, which replay one at a time
                ft.pool = torch.cuda.graph_pool_handle()
            static_ids, static_targets = ids.clone(), targets.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=ft.pool):
                loss = self._loss(static_ids, static_targets, ft.count)
                loss.backward()
            entry = ft.graphs[key] = (graph, static_ids, static_targets, loss.detach())
        else:
            entry[1].copy_(ids)
            entry[2].copy_(targets)
        entry[0].replay()
        return entry[3].clone()

    # -- evaluation -------------------------------------------------------------------------------------

    def evaluate(self, state: TrialState, eval_set: list[MicroBatch]) -> tuple[EvalPoint | None,
                                                                               EvalBatches | None]:
        ft = self._fast.get(state.name)
        if ft is not None:
            self._flush(state, ft)
            if state.status is not None:
                return state.last_eval, state.last_eval_batches
        result = super().evaluate(state, eval_set)
        if ft is not None:
            ft.since = None  # evaluation is not training time
            self.base.train()
        return result

    def evaluate_cut(self, state: TrialState, eval_set: list[MicroBatch], rank: int) -> list[float] | None:
        ft = self._fast.get(state.name)
        if ft is not None:
            self._flush(state, ft)  # the accumulated step first; the cut reads the adapter's own weights
            self._activate(state.name)
        return super().evaluate_cut(state, eval_set, rank)

    def _eval_losses(self, eval_set: list[MicroBatch]) -> tuple[list[float], list[int]]:
        if self._active is None:
            return super()._eval_losses(eval_set)
        import torch
        import torch.nn.functional as F

        groups, counts = self._eval_plan(eval_set)
        self.base.eval()
        sums = torch.zeros(len(counts), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for ids, targets, which in groups:
                logits = self.base(input_ids=ids).logits.flatten(0, 1)
                chunk = max(1, (256 << 20) // (4 * logits.shape[-1]))  # fp32 rows of ≤ 256 MiB at a time
                per_token = torch.cat([F.cross_entropy(lg.float(), t, ignore_index=IGNORE_INDEX, reduction="none")
                                       for lg, t in zip(logits.split(chunk), targets.flatten().split(chunk))])
                sums.index_add_(0, which, per_token.view(ids.shape).sum(1))
        return [s / n for s, n in zip(sums.tolist(), counts)], counts

    def _eval_plan(self, eval_set: list[MicroBatch]):
        """The eval batches with supervised tokens, several to a forward (up to eval_tokens padded
        tokens), each row tagged with its batch; built once per eval set."""
        import torch

        cached = self._eval_plans.get(id(eval_set))
        if cached is not None and cached[0] is eval_set:
            return cached[1], cached[2]
        kept = [mb for mb in eval_set if mb.supervised > 0]
        groups, current = [], []

        multiple = 8 if self.device.type == "cuda" else 1  # no graphs here: shapes may vary, padding need not

        def width(mbs):
            return -(-max(len(x) for mb in mbs for x in mb.input_ids) // multiple) * multiple

        for mb in kept:
            trial = current + [mb]
            if current and sum(len(m.input_ids) for m in trial) * width(trial) > self.options.eval_tokens:
                groups.append(current)
                trial = [mb]
            current = trial
        if current:
            groups.append(current)
        plan, index = [], 0
        for group in groups:
            merged = MicroBatch([x for mb in group for x in mb.input_ids], [y for mb in group for y in mb.labels])
            ids, targets = padded_batch(merged, self.pad_id, multiple)
            which = torch.tensor([index + k for k, mb in enumerate(group) for _ in mb.input_ids])
            index += len(group)
            plan.append(tuple(t.to(self.device) for t in (ids, targets, which)))
        counts = [mb.supervised for mb in kept]
        self._eval_plans[id(eval_set)] = (eval_set, plan, counts)
        return plan, counts

    # -- internals ----------------------------------------------------------------------------------------

    def _to_device(self, micro_batches: list[MicroBatch]) -> list[tuple]:
        """Padded device tensors of these micro-batches, made once for the whole sweep (every trial
        trains on the same batches), in one transfer from pinned memory."""
        import torch

        new = [mb for mb in micro_batches if id(mb) not in self._batches]
        if new:
            built = [padded_batch(mb, self.pad_id, self.pad_multiple) for mb in new]
            flat = torch.cat([t.flatten() for pair in built for t in pair])
            if self.device.type == "cuda":
                flat = flat.pin_memory().to(self.device, non_blocking=True)
            at = 0
            for mb, (ids, targets) in zip(new, built, strict=True):
                n = ids.numel()
                self._batches[id(mb)] = (mb, flat[at:at + n].view(ids.shape), flat[at + n:at + 2 * n].view(ids.shape))
                at += 2 * n
        return [self._batches[id(mb)] for mb in micro_batches]

    def _activate(self, name: str | None) -> None:
        """Put trial `name`'s fast forwards in place of PEFT's (only one trial's at a time)."""
        if self._active == name:
            return
        if self._active in self._fast:
            _uninstall(self._fast[self._active].layers)
        self._active = name if name in self._fast else None
        if self._active is not None:
            _install(self._fast[name].layers)
        if self._attn is not None:
            self.base.config._attn_implementation = self._attn[self._active is not None]

    def _attention(self):
        if self.device.type != "cuda" or not self.options.flash:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _detach(self, state: TrialState) -> None:
        if self._active == state.name:
            self._activate(None)
        self._fast.pop(state.name, None)
        super()._detach(state)

    def _result(self, state: TrialState, saved: bool) -> TrialResult:
        return replace(super()._result(state, saved), engine="fast" if state.name in self._fast else "peft")
