"""Peak GPU memory of a LoRA / QLoRA training step, term by term, and whether it fits a GPU.

What is predicted: `torch.cuda.max_memory_allocated()` over the first steps of the loop the sweep
runs (transformers model with `attn_implementation="sdpa"`, PEFT `get_peft_model`, AdamW
`fused=True`, `loss = model(input_ids, labels=input_ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)`, no autocast). benchmarks/memory/ measures it on a GPU; the
CPU tests check the activations against autograd's saved tensors and the step's peak against an
allocation tracker.

How: the peak is the persistent memory (weights, LoRA weights, optimizer state) plus the largest
working set among the moments of a step that can hold the peak (the loss backward, the loss
forward, DoRA's weight-norm computation, a layer's recompute and backward, the optimizer step).
Activations are the tensors autograd saves for backward, walked op by op through a decoder layer
as transformers and PEFT write it:
- a frozen `nn.Linear` saves nothing (its weight needs no gradient, the weight itself is a
  parameter); only the tensors an op keeps for an input that requires grad count, so the layers
  before the first adapter save nothing at all;
- a LoRA `Linear` casts its input to the adapter dtype (fp32) and applies dropout per module
  (peft/tuners/lora/layer.py `Linear.forward`): every adapted module keeps its own fp32 copy of its
  input plus the dropout mask, q, k and v included, and lora_B keeps the r-wide lora_A output;
- DoRA (peft/tuners/lora/dora.py) also keeps its base output and LoRA output in fp32, and with
  dropout an fp32 copy of the base weight for the backward of `F.linear(x, weight)`;
- RMSNorm upcasts to fp32 and keeps that copy; SiLU/GELU keep their input; the gate·up product
  keeps both factors; SDPA's fused kernels keep q, k, v, the output and a logsumexp, the math
  kernel (fp32 with grouped KV heads) keeps the full B·H·L·L probabilities;
- the loss upcasts the logits to fp32 (transformers `ForCausalLMLoss`), log_softmax keeps its fp32
  output, and its backward holds two more fp32 B·L·vocab tensors: with a 128k vocabulary that
  moment is the peak.
MoE blocks (transformers 5's fused experts, `grouped_mm` by default) keep per routed copy of a
token (top-k per token) the gate_up output, act(gate), the down output and int64 indices, plus the
router's fp32 softmax. PEFT reaches the experts through `target_parameters` (lora.ParamWrapper):
for each forward it swaps the parameter for `baddbmm(W, B, A)`, a full copy of the expert stack in
the weight dtype, which the grouped matmul keeps until backward, so adapted experts cost another
copy of every expert weight; their backward then allocates ΔW's gradient, E × out × in again.
`quant="4bit"` follows `prepare_model_for_kbit_training`, which casts every non-quantized
parameter (embeddings, norms, lm_head) to fp32; without autocast the whole residual stream, and so
every activation, is then fp32.

Pure arithmetic on a `ModelStructure`: no torch import and no weight, for any model size.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace

from ..errors import UsageError, did_you_mean
from ..model.structure import ModelStructure, ModuleInfo
from .count import DTYPE_BYTES, count_plan, human_bytes, rank_for
from .lora_plan import LoraPlan

QUANTS = ("none", "8bit", "4bit")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
GiB = 1024**3
MiB = 1024**2

ADAPTER_BYTES = 4  # PEFT autocast_adapter_dtype=True: LoRA weights are fp32 on a bf16/fp16/4-bit base
# Outside the allocator, so never in max_memory_allocated: the CUDA context, kernels and the
# cuBLAS/cuDNN handles (nvidia-smi shows them); about 0.5 GiB on an H100 with CUDA 12.
CUDA_CONTEXT_BYTES = 512 * MiB
# Reserved exceeds allocated by the caching allocator's rounding and fragmentation; the verdict
# adds this share of the predicted peak (benchmarks/memory/RESULTS.md reports the measured ratio).
ALLOCATOR_MARGIN = 0.10
# cuBLAS workspaces come from the caching allocator: 32 MiB on sm90 (CUBLAS_WORKSPACE_CONFIG
# :4096:8, c10/cuda CublasHandlePool.cpp), one for the forward thread and one for autograd's.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB

NF4_BLOCK = 64  # bitsandbytes quantize_4bit blocksize
DQ_BLOCK = 256  # double quant: absmax constants quantized to 8 bit in blocks of 256
BNB8_MIN_SIZE = 4096  # bitsandbytes 8-bit optimizers keep 32-bit state below this many elements
BNB8_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer state
ALLOC_GRANULE = 512  # the CUDA caching allocator rounds every block up to 512 bytes

_NORM_LEAF = re.compile(r"(^|_)(norm|layernorm|ln)(_|\d|$)|^ln_|layer_?norm|rms_?norm", re.I)
_QK_NORM_LEAF = re.compile(r"^(q|k|query|key)_(norm|layernorm|ln)$", re.I)


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    formula: str  # one line: how the number is made and where the rule comes from

    def to_json(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "human": human_bytes(self.bytes), "formula": self.formula}


@dataclass
class MemoryEstimate:
    terms: list[MemoryTerm]  # they add up to total_bytes: persistent memory + the peak moment's working set
    batch_size: int
    seq_len: int
    dtype: str
    quant: str | None
    grad_ckpt: bool
    optimizer: str
    plan: LoraPlan
    gpu_bytes: int | None = None
    double_quant: bool = True
    peak_phase: str = ""  # the moment of the step that holds the peak
    phases: dict[str, int] = field(default_factory=dict)  # every candidate moment -> its total
    notes: list[str] = field(default_factory=list)
    model: str = ""
    saved_bytes: int = 0  # what autograd keeps at the end of the forward (activations + the loss's)
    _structure: ModelStructure | None = field(default=None, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        """The predicted `torch.cuda.max_memory_allocated()`."""
        return sum(t.bytes for t in self.terms)

    @property
    def needed_bytes(self) -> int:
        """What the GPU must have: the peak, the allocator's margin and the CUDA context."""
        return math.ceil(self.total_bytes * (1 + ALLOCATOR_MARGIN)) + CUDA_CONTEXT_BYTES

    def fits(self, gpu_bytes: int) -> bool:
        return self.needed_bytes <= gpu_bytes

    def options(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "dtype": self.dtype, "quant": self.quant,
                "double_quant": self.double_quant, "grad_ckpt": self.grad_ckpt, "optimizer": self.optimizer}

    def with_options(self, plan: LoraPlan | None = None, **changes) -> MemoryEstimate:
        """The same estimate with other settings (batch, checkpointing, quantization…)."""
        if self._structure is None:
            raise ValueError("this estimate has no structure to re-estimate with")
        opts = {**self.options(), **changes}
        batch, seq = opts.pop("batch_size"), opts.pop("seq_len")
        out = estimate_memory(self._structure, plan or self.plan, batch, seq, **opts)
        out.gpu_bytes = self.gpu_bytes
        return out

    def suggestions(self, gpu_bytes: int) -> list[str]:
        """What would make the step fit, each checked by estimating it again (empty when it fits)."""
        if self.fits(gpu_bytes):
            return []
        out: list[str] = []
        tries: list[tuple[str, dict]] = []
        if not self.grad_ckpt:
            tries.append(("turn on gradient checkpointing (--grad-ckpt)", {"grad_ckpt": True}))
        if self.optimizer == "adamw":
            tries.append(("use 8-bit AdamW (--optimizer adamw8bit)", {"optimizer": "adamw8bit"}))
        if self.quant is None:
            tries.append(("load the base in 4 bit, QLoRA (--quant 4bit)", {"quant": "4bit"}))
            if not self.grad_ckpt:
                tries.append(("QLoRA with gradient checkpointing (--quant 4bit --grad-ckpt)",
                              {"quant": "4bit", "grad_ckpt": True}))
        for text, change in tries:
            other = self.with_options(**change)
            if other.fits(gpu_bytes):
                out.append(f"{text}: needs {human_bytes(other.needed_bytes)}")
        batch = self._largest(gpu_bytes, "batch_size", self.batch_size - 1)
        if batch:
            out.append(f"--batch-size {batch}, the largest that fits (gradient accumulation "
                       f"{math.ceil(self.batch_size / batch)} keeps the tokens per step): "
                       f"needs {human_bytes(self.with_options(batch_size=batch).needed_bytes)}")
        else:
            seq = self._largest(gpu_bytes, "seq_len", self.seq_len - 1, batch_size=1)
            if seq:
                out.append(f"--batch-size 1 --seq-len {seq}, the longest that fits: needs "
                           f"{human_bytes(self.with_options(batch_size=1, seq_len=seq).needed_bytes)}")
        if not out and not self.grad_ckpt:
            best = {"grad_ckpt": True, "optimizer": "adamw8bit" if self.optimizer == "adamw" else self.optimizer}
            if self.quant is None:
                best["quant"] = "4bit"
            batch = self._largest(gpu_bytes, "batch_size", self.batch_size, **best)
            if batch:
                flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in best.items())
                out.append(f"{flags} --batch-size {batch}: needs "
                           f"{human_bytes(self.with_options(batch_size=batch, **best).needed_bytes)}")
        if not out:
            floor = self.with_options(batch_size=1, seq_len=1, grad_ckpt=True, quant="4bit", optimizer="sgd")
            out.append(f"nothing fits on {human_bytes(gpu_bytes)}: even 4-bit weights with one token need "
                       f"{human_bytes(floor.needed_bytes)}; use a larger GPU or a smaller model")
        return out

    def _largest(self, gpu_bytes: int, key: str, upper: int, **changes) -> int:
        """The largest value of batch_size or seq_len in [1, upper] that fits (memory grows with both)."""
        lo, hi = 0, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.with_options(**{key: mid}, **changes).fits(gpu_bytes):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def to_json(self) -> dict:
        data = {
            "model": self.model,
            "total_bytes": self.total_bytes,
            "total": human_bytes(self.total_bytes),
            "predicts": "torch.cuda.max_memory_allocated",
            "peak_phase": self.peak_phase,
            "terms": [t.to_json() for t in self.terms],
            "phases": self.phases,
            "cuda_context_bytes": CUDA_CONTEXT_BYTES,
            "allocator_margin": ALLOCATOR_MARGIN,
            "needed_bytes": self.needed_bytes,
            **self.options(),
            "plan": self.plan.to_dict(),
            "notes": self.notes,
        }
        if self.gpu_bytes is not None:
            data["gpu_bytes"] = self.gpu_bytes
            data["fits"] = self.fits(self.gpu_bytes)
            data["suggestions"] = self.suggestions(self.gpu_bytes)
        return data


# -- sizes ----------------------------------------------------------------------------------------


_UNITS = {"": GiB, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1024 * GiB, "tb": 1024 * GiB, "tib": 1024 * GiB}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """A GPU memory size in bytes: "24GiB", "24GB", "80G", "24" (GiB), "40960MiB".

    GB means GiB, as GPU makers use it: a "24 GB" RTX 4090 has 24 GiB, an "80 GB" H100 79.2 GiB.
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"cannot read the GPU memory size '{text}'", "e.g. 24GiB, 80GB, 40960MiB or 24 (GiB)")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UsageError(f"GPU memory must be positive, got '{text}'", "e.g. 24GiB")
    return int(value)


# -- the model's shape as the activation walk needs it -------------------------------------------


@dataclass(frozen=True)
class _Moe:
    """One MoE block as transformers 5 writes it (`@use_experts_implementation`): a top-k router
    (a raw `weight` parameter) and the experts fused in 3-D parameters, gate_up (or up) then down."""

    experts: int
    top_k: int
    first: ModuleInfo  # gate_up_proj (E, 2I, H), or up_proj for non-gated experts
    down: ModuleInfo  # down_proj (E, H, I)
    router: ModuleInfo | None
    normalizes: bool  # the top-k weights are divided by their sum (norm_topk_prob)
    weight_bytes: int  # the routing weights' dtype as the experts multiply by them (0: the activation's)

    @property
    def gated(self) -> bool:
        return self.first.out_features == 2 * self.down.in_features


@dataclass(frozen=True)
class _Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norm: str  # "rms" (computed in fp32) or "layer"
    rotary: bool
    layers: dict[int, dict[str, ModuleInfo]]  # layer -> role -> one weight of that role
    norms_per_layer: dict[int, int]
    qk_norm: bool
    moe: dict[int, _Moe] = field(default_factory=dict)  # layer -> its MoE block

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _first(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _shape_of(structure: ModelStructure) -> _Shape:
    config = structure.text_config()
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model", "dim", default=0))
    heads = int(_first(config, "num_attention_heads", "n_head", "num_heads", "n_heads", default=1))
    kv_heads = int(_first(config, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=0) or 0)
    if not kv_heads:
        kv_heads = 1 if config.get("multi_query") else heads
    head_dim = int(_first(config, "head_dim", "d_kv", default=0) or (hidden // heads if heads else 0))
    layers: dict[int, dict[str, ModuleInfo]] = {}
    for m in structure.modules:
        if m.layer is not None and m.role not in ("other", "embed", "lm_head"):
            layers.setdefault(m.layer, {}).setdefault(m.role, m)
    out_emb = structure.by_name.get(structure.output_embeddings or "")
    vocab = out_emb.out_features if out_emb is not None else int(_first(config, "vocab_size", default=0))
    norms: dict[int, int] = {}
    qk_norm = False
    for name in structure.module_names:
        leaf = name.rpartition(".")[2]
        index = _layer_of(name)
        if index is None:
            continue
        if _QK_NORM_LEAF.match(leaf):
            qk_norm = True
        elif _NORM_LEAF.search(leaf) and name.count(".") == _layer_depth(name):
            norms[index] = norms.get(index, 0) + 1
    moe = _moe_blocks(structure, config, hidden)
    rotary = any(k in config for k in ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim",
                                        "rotary_pct", "partial_rotary_factor", "rotary_emb_base"))
    norm = "rms" if any("rms" in k for k in config) else "layer"
    return _Shape(hidden, heads, kv_heads, head_dim, vocab, norm, rotary, layers, norms, qk_norm, moe)


# Routers that cast the top-k weights back to the activation dtype (`.to(router_logits.dtype)`);
# the others (Mixtral's) multiply the expert outputs by fp32 weights. From transformers 5.17.
_ROUTER_CASTS = {"qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe",
                 "olmoe", "flex_olmo", "hunyuan_v1_moe", "mellum"}


def _moe_blocks(structure: ModelStructure, config: dict, hidden: int) -> dict[int, _Moe]:
    """layer -> its MoE block, for the layers whose experts are fused 3-D parameters."""
    experts: dict[int, list[ModuleInfo]] = {}
    routers: dict[int, ModuleInfo] = {}
    for m in structure.modules:
        if m.layer is None:
            continue
        if m.role == "experts" and m.experts > 1:
            experts.setdefault(m.layer, []).append(m)
        elif m.role == "router" and m.is_parameter and m.in_features == hidden:
            routers.setdefault(m.layer, m)
    top_k = _first(config, "num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", default=1)
    top_k = int(top_k[0] if isinstance(top_k, list) else top_k)
    normalizes = bool(config.get("norm_topk_prob", True))  # Mixtral's router always renormalises
    weight_bytes = 0 if structure.model_type in _ROUTER_CASTS else 4
    out = {}
    for layer, params in experts.items():
        down = next((p for p in params if p.guess == "down"), None) or \
            next((p for p in params if p.out_features == hidden), None)
        first = next((p for p in params if p is not down and p.in_features == hidden), None)
        if down is None or first is None:
            continue
        out[layer] = _Moe(first.experts, top_k, first, down, routers.get(layer), normalizes, weight_bytes)
    return out


_LAYER_INDEX = re.compile(r"^(.*?\.)(\d+)(\.|$)")


def _layer_of(name: str) -> int | None:
    match = _LAYER_INDEX.match(name)
    return int(match.group(2)) if match else None


def _layer_depth(name: str) -> int:
    """Dots in `model.layers.3.input_layernorm`: the norm sits right under the numbered layer."""
    match = _LAYER_INDEX.match(name)
    return match.group(1).count(".") + 1 if match else -1


# -- what the step keeps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Facts of the device that change what autograd keeps (defaults: a CUDA sm80+ GPU)."""

    # CUDA's fused native_dropout keeps a bool mask (1 byte); the CPU keeps a scaled noise tensor
    # in the input's dtype, fp32 here: 4 (aten/src/ATen/native/Dropout.cpp is_fused_kernel_acceptable).
    mask_bytes: int = 1
    # None: the SDPA backend PyTorch picks on CUDA; "fused" or "math" to force one.
    attention: str | None = None


@dataclass
class _Step:
    """Everything fixed for one estimate."""

    shape: _Shape
    act: int  # bytes of an activation element (the residual stream's dtype)
    dropout: bool
    dora: bool
    quant: str
    kernel: str  # "fused" | "math"
    mask_bytes: int
    seq_len: int
    weight_fp32: bool = False  # an fp32 base weight: DoRA's W.to(fp32) is the parameter itself, no copy

    @property
    def cast(self) -> bool:
        """Whether the LoRA input cast to fp32 makes a copy."""
        return self.act != ADAPTER_BYTES


@dataclass
class _LayerSaved:
    per_token: Counter  # category -> bytes per token
    # bytes independent of the tokens, by term: DoRA's fp32 weight copies, the experts' W + ΔW
    fixed: Counter = field(default_factory=Counter)
    grad_out: bool = False
    rope: bool = False
    dora_transient: int = 0  # the largest transient of one DoRA weight-norm computation
    mlp_width: int = 0
    down_adapted: bool = False
    # the MoE block's backward moments: (bytes per token, fixed bytes) above what the layer keeps
    moe_backward: list[tuple[int, int]] = field(default_factory=list)

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())


def sdpa_kernel(act_bytes: int, heads: int, kv_heads: int, head_dim: int) -> str:
    """The SDPA backend PyTorch picks on an sm80+ GPU for a causal call without mask
    (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): flash (or cuDNN) for fp16/bf16 with
    head_dim <= 256, grouped KV heads included; memory-efficient for fp32 only without grouped
    KV heads; otherwise the math kernel. Both fused ones keep the same tensors."""
    half = act_bytes == 2
    if half and head_dim <= 256:
        return "fused"
    if kv_heads == heads and head_dim % 4 == 0:
        return "fused"
    return "math"


def _norm_bytes(step: _Step, width: int) -> int:
    if step.shape.norm == "rms":
        return 4 * width + 4  # LlamaRMSNorm: the fp32 input (pow and mul keep it) + rsqrt per token
    return step.act * width + 8  # native_layer_norm keeps its input, mean and rstd (fp32)


def _adapter_saved(step: _Step, m: ModuleInfo, r: int, grad_in: bool, group: str, shared: set[str],
                   input_kept: bool, out: _LayerSaved) -> None:
    """What one adapted Linear keeps for backward (peft/tuners/lora/layer.py, dora.py).

    `input_kept`: the module's input tensor is already saved by another op (SDPA's output).
    """
    a, n_in, n_out = ADAPTER_BYTES, m.in_features, m.out_features
    saved = out.per_token
    if step.dropout:
        saved["LoRA inputs"] += a * n_in  # dropout(x.to(fp32)), kept by lora_A
        if grad_in:
            saved["LoRA inputs"] += step.mask_bytes * n_in  # the dropout mask
    elif step.cast:
        saved["LoRA inputs"] += a * n_in  # x.to(fp32), one copy per module
    elif group not in shared and not input_kept:
        shared.add(group)
        saved["LoRA inputs"] += a * n_in  # x itself, shared by every module reading it
    saved["LoRA inputs"] += a * r  # lora_A's output, kept by lora_B
    if step.dora:
        saved["DoRA"] += a * n_out  # the LoRA output, kept by magnitude * lora_result
        if step.dropout:
            saved["DoRA"] += a * n_out  # F.linear(x, W) recomputed in fp32, kept by (m/‖W‖ - 1) * base
            if grad_in and not step.weight_fp32:
                out.fixed[_DORA_FIXED] += a * n_in * n_out  # W.to(fp32), a copy kept by F.linear for grad of x
        else:
            saved["DoRA"] += step.act * n_out  # the base output, kept by (m/‖W‖ - 1) * base
        # ‖W + scaling·BA‖ (kept by the division), m/‖W‖ (by m/‖W‖ · lora), m/‖W‖ - 1 (by its product)
        out.fixed[_DORA_FIXED] += 4 * n_out * (3 if grad_in else 2)
        # get_lora_weight/get_weight_norm: eye(in), A·eye, B·A·eye, W in fp32, scaling·BA, W + scaling·BA
        out.dora_transient = max(out.dora_transient, a * (n_in * n_in + n_in * r + 4 * n_in * n_out))


def _layer_saved(step: _Step, index: int, adapters: dict[str, list[tuple[ModuleInfo, int]]],
                 grad_in: bool) -> _LayerSaved:
    """Walk one decoder layer (pre-norm attention then MLP) and add up what autograd keeps."""
    shape = step.shape
    roles = shape.layers.get(index, {})
    out = _LayerSaved(per_token=Counter())
    saved = out.per_token
    shared: set[str] = set()
    s = step.act
    norms = max(shape.norms_per_layer.get(index, 2), 1)
    g = grad_in

    def adapt(role: str, grad: bool, group: str, input_kept: bool = False) -> bool:
        for module, r in adapters.get(role, ()):
            _adapter_saved(step, module, r, grad, group, shared, input_kept, out)
        return role in adapters

    def bnb8_input(grad: bool, group: str, width: int, input_kept: bool = False) -> None:
        # bitsandbytes MatMul8bitLt keeps its input A for grad_A when A requires grad
        if step.quant == "8bit" and grad and group not in shared and not input_kept:
            shared.add(group)
            saved["8-bit matmul inputs"] += s * width

    # attention block
    if g:
        saved["norms"] += _norm_bytes(step, shape.hidden)
    grads = {}
    for role in ("q", "k", "v", "qkv", "kv"):
        if role in roles:
            grads[role] = adapt(role, g, "attn_in") or g
            bnb8_input(g, "attn_in", shape.hidden)
    q_g = grads.get("q", False) or grads.get("qkv", False)
    k_g = grads.get("k", False) or grads.get("kv", False) or grads.get("qkv", False)
    v_g = grads.get("v", False) or grads.get("kv", False) or grads.get("qkv", False)
    if shape.qk_norm:
        if q_g:
            saved["norms"] += 4 * shape.q_dim + 4 * shape.heads
        if k_g:
            saved["norms"] += 4 * shape.kv_dim + 4 * shape.kv_heads
    out.rope = shape.rotary and (q_g or k_g)
    attn_g = q_g or k_g or v_g
    if attn_g:
        saved["attention"] += _attention_bytes(step, q_g, k_g, v_g)
    o_kept = step.kernel == "fused"  # flash's output is laid out (B, L, H, hd): o_proj reads it as a view
    o_g = attn_g
    if "o" in roles:
        o_g = adapt("o", attn_g, "attn_out", input_kept=o_kept) or attn_g
        bnb8_input(attn_g, "attn_out", shape.q_dim, input_kept=o_kept)
    g_mid = g or o_g
    # MLP block (every further norm of the layer sits on the residual stream after attention)
    if g_mid:
        saved["norms"] += (norms - 1) * _norm_bytes(step, shape.hidden)
    gate_g = up_g = False
    if "gate_up" in roles:
        width = roles["gate_up"].out_features // 2
        gate_g = up_g = adapt("gate_up", g_mid, "mlp_in") or g_mid
        bnb8_input(g_mid, "mlp_in", shape.hidden)
    else:
        for role in ("gate", "up"):
            if role in roles:
                got = adapt(role, g_mid, "mlp_in") or g_mid
                bnb8_input(g_mid, "mlp_in", shape.hidden)
                gate_g, up_g = (got, up_g) if role == "gate" else (gate_g, got)
        width = (roles.get("down") or roles.get("up") or roles.get("gate"))
        width = width.in_features if "down" in roles else (width.out_features if width else 0)
    out.mlp_width = width
    gated = "gate" in roles or "gate_up" in roles
    if gated:
        if gate_g:
            saved["MLP"] += s * width  # the activation's input (SiLU/GELU keep it)
            saved["MLP"] += s * width  # up, kept by act(gate) * up for the gradient of act
        if up_g:
            saved["MLP"] += s * width  # act(gate), kept for the gradient of up
        down_in_g = gate_g or up_g
    else:
        if up_g:
            saved["MLP"] += s * width  # the activation's input
        down_in_g = up_g
    down_g = down_in_g
    out.down_adapted = "down" in adapters
    if "down" in roles:
        down_g = adapt("down", down_in_g, "mlp_mid") or down_in_g
        bnb8_input(down_in_g, "mlp_mid", width)
    out.grad_out = g_mid or down_g
    walked = _WALKED
    moe = shape.moe.get(index)
    if moe is not None:
        out.grad_out = _moe_saved(step, moe, adapters, g_mid, shared, out) or out.grad_out
        walked = walked | {"experts", "router"}
    # weights the walk has no place for (an unrecognised Linear, a router outside an MoE block): their
    # LoRA inputs at least, with the gradient state of the layer's output
    for role in set(adapters) - walked:
        adapt(role, out.grad_out, f"other:{role}")
    return out


_WALKED = {"q", "k", "v", "qkv", "kv", "o", "gate", "up", "gate_up", "down"}
_DORA_FIXED = "DoRA fp32 weight copies and norms"
_EXPERTS_FIXED = "experts: W + ΔW copies (PEFT ParamWrapper)"
_MOE_OFFSETS = "MoE grouped-matmul offsets"


def _moe_saved(step: _Step, moe: _Moe, adapters: dict[str, list[tuple[ModuleInfo, int]]], g: bool,
               shared: set[str], out: _LayerSaved) -> bool:
    """What an MoE block keeps for backward (transformers integrations/moe.py
    `grouped_mm_experts_forward`, the default experts implementation; the router as in qwen3_moe and
    mixtral), with PEFT's `ParamWrapper` on the adapted expert and router parameters
    (peft/tuners/lora/layer.py): while the block runs, the parameter is replaced by
    `baddbmm(W, B, A)` (`_LoraFactorsProxy`; W + B·A for the 2-D router): a full copy of the expert
    stack in the weight dtype, which the grouped matmul keeps for its input's gradient until backward.
    `g`: the block's input needs grad. Returns whether its output needs grad."""
    s, k, experts, hidden = step.act, moe.top_k, moe.experts, moe.first.in_features
    width = moe.down.in_features
    saved, fixed = out.per_token, out.fixed
    ranks = {m.name: r for m, r in [*adapters.get("experts", ()), *adapters.get("router", ())]}
    first_r, down_r = ranks.get(moe.first.name), ranks.get(moe.down.name)
    router_r = ranks.get(moe.router.name) if moe.router is not None else None
    weights = moe.weight_bytes or s
    # router: F.linear(x, W + ΔW) keeps x for ΔW's gradient and W + ΔW for x's; softmax in fp32
    # keeps its output, topk its indices, the renormalisation the top-k values and their sum
    if router_r:
        if "mlp_in" not in shared:
            shared.add("mlp_in")
            saved["MoE router"] += s * hidden
        if g:
            fixed[_EXPERTS_FIXED] += s * moe.router.out_features * hidden
    logits_g = g or bool(router_r)
    if logits_g:
        saved["MoE router"] += 4 * experts + 8 * k + (4 * k + 4 if moe.normalizes else 0)

    def expert_param(m: ModuleInfo, r: int, input_width: int, input_g: bool) -> None:
        saved["MoE experts"] += k * s * input_width  # the grouped matmul's input, for ΔW's gradient
        if input_g:
            fixed[_EXPERTS_FIXED] += s * m.experts * m.in_features * m.out_features  # W + ΔW
        fixed[_EXPERTS_FIXED] += s * m.experts * r * (m.in_features + m.out_features)  # B, A cast for baddbmm

    # experts, per routed copy of a token (B·L·top_k rows sorted by expert)
    if g:
        saved["MoE experts"] += 8 * k  # x[perm // top_k] keeps its int64 index
    if logits_g:
        saved["MoE experts"] += 8 * k  # weights[perm] keeps perm
    if g or first_r or down_r:
        saved["MoE experts"] += k  # the bool mask the three masked_fill calls share
    if first_r:
        expert_param(moe.first, first_r, hidden, g)
    h_g = g or bool(first_r)
    if h_g:
        saved["MoE experts"] += k * s * moe.first.out_features  # gate_up output (act keeps gate, the product up)
        if moe.gated:
            saved["MoE experts"] += k * s * width  # act(gate), kept by the product
    if down_r:
        expert_param(moe.down, down_r, width, h_g)
    o_g = h_g or bool(down_r)
    if o_g:
        fixed[_MOE_OFFSETS] += 4 * experts  # the int32 offsets both grouped matmuls keep
    if logits_g:
        saved["MoE experts"] += k * s * hidden  # the down output, kept for the routing weights' gradient
    if o_g:
        saved["MoE experts"] += k * weights  # the routing weight, kept for the output's gradient
    if o_g or logits_g:
        saved["MoE experts"] += 8 * k  # out[inv_perm] keeps inv_perm
    if o_g or logits_g:
        out.moe_backward = _moe_backward(step, moe, g, logits_g, first_r, down_r)
    return o_g or logits_g


def _moe_backward(step: _Step, moe: _Moe, g: bool, logits_g: bool, first_r: int | None,
                  down_r: int | None) -> list[tuple[int, int]]:
    """The MoE block's backward moments, each as (bytes per token, fixed bytes) above what the layer
    keeps, less what earlier steps of its backward already freed (autograd frees a node's saved
    tensors once it ran). In the order they happen:
    - routing-weight product: the gradient of `out · w` in their common dtype, a product per input
      needing grad, and the cast back to the activation dtype (fp32 weights: Mixtral);
    - down grouped matmul: its output's gradient, ΔW's gradient (E × H × I: grad of mat2 comes first),
      its input's gradient;
    - act(gate)·up: the product's gradient and its two factors' (3 × I per routed copy);
    - gate_up grouped matmul: its output's gradient, ΔW's gradient (E × 2I × H), its input's."""
    s, k, experts, hidden = step.act, moe.top_k, moe.experts, moe.first.in_features
    width, first, down = moe.down.in_features, moe.first, moe.down
    weights = moe.weight_bytes or s
    wide = max(s, weights)  # the routed outputs times fp32 weights are fp32
    h_g = g or bool(first_r)
    o_g = h_g or bool(down_r)
    routing_grad = k * weights if logits_g else 0  # the routing weights' gradient, alive until the router's
    freed = (k * s * hidden if logits_g else 0) + (k * weights if o_g else 0) + 8 * k
    moments = [(k * hidden * wide * (1 + o_g + logits_g) + (k * s * hidden if o_g and wide != s else 0), 0)]
    grad_down = s * experts * hidden * width if down_r else 0
    moments.append((-freed + k * s * hidden + (k * s * width if h_g else 0) + routing_grad, grad_down))
    if down_r:  # the down grouped matmul and its baddbmm ran: their saved tensors are gone, A's and B's grads exist
        freed += k * s * width
        factors = experts * down_r * (down.in_features + down.out_features)
        fixed_freed = (s * experts * hidden * width if h_g else 0) + s * factors - ADAPTER_BYTES * factors
    else:
        fixed_freed = 0
    if h_g:
        moments.append((-freed + 3 * k * s * width + routing_grad, -fixed_freed))
        freed += k * s * (first.out_features + (width if moe.gated else 0))
    if g or first_r:
        grad_first = s * experts * first.in_features * first.out_features if first_r else 0
        moments.append((-freed + k * s * first.out_features + (k * s * hidden if g else 0) + routing_grad,
                        grad_first - fixed_freed))
    return moments


def _attention_bytes(step: _Step, q_g: bool, k_g: bool, v_g: bool) -> int:
    """Per token, what scaled_dot_product_attention keeps."""
    shape, s = step.shape, step.act
    if step.kernel == "fused":
        # one backward for all inputs: q (after rotary), k, v, the output, an fp32 logsumexp per head
        return s * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.heads
    # math kernel (aten attention.cpp _scaled_dot_product_attention_math) in fp32: each matmul keeps
    # the factor the other input's gradient needs: scaled q (for k), scaled k repeated to all heads
    # (for q), the B·H·L·L probabilities and v repeated to all heads
    out = 4 * shape.q_dim * (int(k_g) + int(q_g) + int(q_g or k_g))
    return out + 4 * shape.heads * step.seq_len


def _adapters_by_layer(structure: ModelStructure, plan: LoraPlan, resolved) -> dict[int | None, dict]:
    """layer (None outside the stack) -> role -> [(adapted weight, its rank)]."""
    rank_pattern = {**dict(plan.rank_pattern), **resolved.rank_pattern(plan.r, plan.alpha)[0]}
    out: dict[int | None, dict] = {}
    for m in resolved.modules:
        role = m.role
        if m.name == structure.output_embeddings:
            role = "lm_head"
        elif m.kind == "embedding":
            role = "embed"
        layer = m.layer if role not in ("lm_head", "embed") else None
        out.setdefault(layer, {}).setdefault(role, []).append((m, rank_for(rank_pattern, plan.r, m.name)))
    return out


# -- the estimate ----------------------------------------------------------------------------------


def estimate_memory(structure: ModelStructure, plan: LoraPlan, batch_size: int, seq_len: int, *,
                    dtype: str = "bf16", quant: str | None = None, double_quant: bool = True,
                    grad_ckpt: bool = False, optimizer: str = "adamw",
                    runtime: Runtime | None = None) -> MemoryEstimate:
    """Predict `torch.cuda.max_memory_allocated()` of a training step, term by term."""
    dtype, quant, optimizer = _check(batch_size, seq_len, dtype, quant, optimizer)
    runtime = runtime or Runtime()
    counted = count_plan(structure, plan)
    shape = _shape_of(structure)
    n = batch_size * seq_len
    base = DTYPE_BYTES[dtype]
    kbit = quant != "none"
    act = 4 if kbit else base  # prepare_model_for_kbit_training: fp32 embeddings -> fp32 residual stream
    kernel = runtime.attention or sdpa_kernel(act, shape.heads, shape.kv_heads, shape.head_dim)
    step = _Step(shape, act, plan.lora_dropout > 0, plan.use_dora, quant, kernel, runtime.mask_bytes, seq_len,
                 weight_fp32=base == 4 and not kbit)

    trainable = _trainable(structure, plan, counted, base, kbit)
    persistent = _weight_terms(structure, dtype, quant, double_quant) + [
        MemoryTerm("LoRA weights", trainable.bytes, trainable.formula),
        _optimizer_term(optimizer, trainable),
        MemoryTerm("inputs", 2 * 8 * n, f"input_ids and labels, int64: 2 × 8 B × {n:,} tokens"),
        MemoryTerm("cuBLAS workspaces", CUBLAS_WORKSPACE_BYTES,
                   "2 × 32 MiB from the allocator (sm90 CUBLAS_WORKSPACE_CONFIG; forward and autograd threads)"),
    ]

    # what autograd keeps, layer by layer: a layer saves only once something before it needs grad
    adapters = _adapters_by_layer(structure, plan, counted.targets)
    outside = adapters.get(None, {})
    layer_ids = sorted(shape.layers) or [0]
    grad = grad_ckpt or "embed" in outside  # enable_input_require_grads / a LoRA on the embedding
    layers: list[_LayerSaved] = []
    for index in layer_ids:
        layers.append(_layer_saved(step, index, adapters.get(index, {}), grad))
        grad = grad or layers[-1].grad_out
    tail = _LayerSaved(per_token=Counter())  # after the last layer
    if grad:
        tail.per_token["norms"] += _norm_bytes(step, shape.hidden)  # the final norm
    for module, r in outside.get("lm_head", ()):
        _adapter_saved(step, module, r, grad, "final", set(), False, tail)
    for _, r in outside.get("embed", ()):
        tail.per_token["LoRA inputs"] += ADAPTER_BYTES * r + 8  # after_A and the ids it gathers
    if trainable.full_lm_head:
        tail.per_token["norms"] += act * shape.hidden  # a fully trained lm_head keeps its input
    rope = 2 * act * seq_len * shape.head_dim if any(x.rope for x in layers) else 0  # cos, sin (1, L, hd)
    tail_terms = _saved_terms("after the layers", tail.per_token, n, step)
    if rope:
        tail_terms.append(MemoryTerm("rotary cos/sin", rope,
                                     "2 × L × head_dim in the activation dtype, kept by q·cos and rotate_half(q)·sin"))
    v = shape.vocab
    loss_saved = _loss_saved_term(v, n)
    logit = 4 if kbit else base  # lm_head's dtype (fp32 after prepare_model_for_kbit_training)

    phases: dict[str, list[MemoryTerm]] = {}
    if grad_ckpt:
        # torch.utils.checkpoint keeps each layer's input; a layer's tensors exist again only
        # while its backward recomputes it
        held = [_checkpoint_term(len(layer_ids), act, shape.hidden, n)] + tail_terms

        def recompute_of(pos: int) -> list[MemoryTerm]:
            # backward runs the layers last to first: at layer `pos` the checkpoints of the layers
            # after it are freed and their LoRA gradients exist (large with MoE experts adapted)
            x = layers[pos]
            later = trainable.grad_by_layer.get("lm_head", 0) + sum(
                trainable.grad_by_layer.get(index, 0) for index in layer_ids[pos + 1:])
            return [_checkpoint_term(pos + 1, act, shape.hidden, n), MemoryTerm(
                "one layer recomputed", sum(x.per_token.values()) * n + x.fixed_bytes,
                f"{sum(x.per_token.values()):,} B/token × {n:,} tokens{_fixed_text(x.fixed)}: what layer {pos} "
                f"keeps ({_listing(x.per_token)}), rebuilt in its backward"),
                MemoryTerm("LoRA gradients of the later layers", later,
                           f"4 B × the LoRA params of the {len(layer_ids) - pos - 1} layers after it (and lm_head)"),
                *_backward_terms(step, x, n, shape.hidden)]

        recompute = max((recompute_of(pos) for pos in range(len(layers))), key=lambda ts: sum(t.bytes for t in ts))
        if plan.use_dora:
            recompute.append(_dora_transient_term(max(x.dora_transient for x in layers)))
        phases["layer recompute + backward"] = recompute
        kv_cache = 0
    else:
        per_token, fixed = Counter(), Counter()
        for x in layers:
            per_token.update(x.per_token)
            fixed.update(x.fixed)
        held = _saved_terms(f"activations, {len(layer_ids)} layers", per_token, n, step)
        held += [MemoryTerm(name, value, _FIXED_WHY[name]) for name, value in fixed.items() if value]
        held += tail_terms
        phases["last layer backward"] = held + _backward_terms(step, layers[-1], n, shape.hidden,
                                                               sum(t.bytes for t in tail_terms))
        if plan.use_dora:
            phases["DoRA weight norm (forward)"] = held + [
                _dora_transient_term(max(x.dora_transient for x in layers))]
        # DynamicCache (use_cache without checkpointing) holds its own k/v copies until the output
        # is dropped; the fused kernels keep those very copies, the math kernel keeps its own
        kv_cache = len(layer_ids) * 2 * act * shape.kv_dim * n if kernel == "math" else 0
    phases["loss backward"] = held + [loss_saved, _loss_backward_term(v, n)]
    phases["loss forward"] = held + [_loss_forward_term(v, n, logit, kv_cache)]
    phases["optimizer step"] = [MemoryTerm("LoRA gradients", trainable.bytes,
                                           f"4 B × {trainable.params:,} trainable params, from backward "
                                           "to zero_grad(set_to_none=True)")]

    totals = {name: sum(t.bytes for t in terms) for name, terms in phases.items()}
    peak = max(totals, key=totals.get)
    peak_terms = [t for t in phases[peak] if t.bytes]
    if peak != "optimizer step" and not any(t.name.startswith("LoRA gradients") for t in peak_terms):
        peak_terms.append(MemoryTerm("LoRA gradients", 0,
                                     f"{human_bytes(trainable.bytes)}, allocated during backward after "
                                     f"this peak ({peak}); freed by zero_grad before the next"))
    persistent_total = sum(t.bytes for t in persistent)
    return MemoryEstimate(
        terms=[t for t in persistent if t.bytes] + peak_terms,
        batch_size=batch_size, seq_len=seq_len, dtype=dtype, quant=None if quant == "none" else quant,
        grad_ckpt=grad_ckpt, optimizer=optimizer, plan=plan, double_quant=double_quant,
        peak_phase=peak, phases={k: persistent_total + val for k, val in totals.items()},
        notes=list(counted.targets.notes) + _notes(step, structure, quant) + _expert_copy_note(layers, grad_ckpt),
        model=structure.source, saved_bytes=sum(t.bytes for t in held) + loss_saved.bytes,
        _structure=structure,
    )


def _check(batch_size, seq_len, dtype, quant, optimizer) -> tuple[str, str, str]:
    for name, value, flag in (("batch size", batch_size, "--batch-size 4"),
                              ("sequence length", seq_len, "--seq-len 2048")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value!r}", f"e.g. {flag}")
    dtype = str(dtype).lower()
    if dtype not in DTYPE_BYTES:
        raise UsageError(f"unknown dtype '{dtype}'", did_you_mean(dtype, DTYPE_BYTES) or "choose bf16, fp16 or fp32")
    quant = "none" if quant in (None, False) else str(quant).lower()
    if quant not in QUANTS:
        raise UsageError(f"unknown quantization '{quant}'",
                         did_you_mean(quant, QUANTS) or "choose none, 8bit or 4bit (QLoRA NF4)")
    optimizer = str(optimizer).lower()
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{optimizer}'",
                         did_you_mean(optimizer, OPTIMIZERS) or "choose adamw, adamw8bit or sgd")
    return dtype, quant, optimizer


_FIXED_WHY = {
    _DORA_FIXED: "4 B × in × out per DoRA module whose input needs grad (dora.py: F.linear(x, W.to(fp32)) keeps W "
                 "for the gradient of x) + ‖W‖ vectors",
    _EXPERTS_FIXED: "per adapted expert stack, E × in × out in the weight dtype: PEFT's ParamWrapper replaces W by "
                    "baddbmm(W, B, A) for the forward and the grouped matmul keeps it for its input's gradient "
                    "(+ the bf16 B and A it was made from)",
    _MOE_OFFSETS: "4 B × experts per MoE layer: the int32 cumulative token counts grouped_mm keeps",
}


def _fixed_text(fixed: Counter) -> str:
    return "".join(f" + {human_bytes(v)} {name}" for name, v in fixed.items() if v)


def _listing(per_token: Counter) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in per_token.items() if v)


def _why(category: str, step: _Step) -> str:
    if category == "attention":
        if step.kernel == "math":
            return "SDPA math kernel: scaled q, k and v repeated to all heads, B·H·L·L probabilities (fp32)"
        return "SDPA flash/cuDNN: q, k, v, output, fp32 logsumexp per head"
    return {
        "norms": "RMSNorm keeps its fp32 input and rsqrt (4·hidden + 4 per norm)" if step.shape.norm == "rms"
        else "LayerNorm keeps its input, mean and rstd",
        "MLP": "activation input, up and act(gate): 3 × intermediate",
        "LoRA inputs": f"per adapted module: its input in fp32{' + dropout mask' if step.dropout else ''}"
                       " + lora_A's r-wide output (peft lora/layer.py)",
        "DoRA": "per DoRA module: LoRA and base outputs (dora.py)",
        "8-bit matmul inputs": "bitsandbytes MatMul8bitLt keeps its input",
        "MoE router": "fp32 softmax over the experts, top-k indices and weights (+ its input when adapted)",
        "MoE experts": "per routed copy (top-k per token): gate_up output, act(gate), down output, indices, "
                       "the routing weight (+ the grouped matmul inputs of adapted experts)",
    }.get(category, "")


def _saved_terms(where: str, per_token: Counter, n: int, step: _Step) -> list[MemoryTerm]:
    return [MemoryTerm(f"{category} ({where})", value * n, f"{value:,} B/token × {n:,} tokens: {_why(category, step)}")
            for category, value in per_token.items() if value]


def _loss_saved_term(v: int, n: int) -> MemoryTerm:
    return MemoryTerm("loss: log_softmax output", 4 * v * n + 8 * n,
                      f"4 B × vocab {v:,} × {n:,} tokens, fp32 (transformers upcasts the logits for the loss), "
                      "+ int64 labels")


def _loss_backward_term(v: int, n: int) -> MemoryTerm:
    return MemoryTerm("loss backward: logit gradients", 8 * v * n,
                      f"2 × 4 B × vocab {v:,} × {n:,} tokens: nll_loss's and log_softmax's fp32 gradients, "
                      "next to the kept output")


def _loss_forward_term(v: int, n: int, logit: int, kv_cache: int) -> MemoryTerm:
    upcast = 4 if logit < 4 else 0  # .float() of fp32 logits is the same tensor
    text = (f"({logit} logits{f' + {upcast} fp32 upcast' if upcast else ''} + 4 log_softmax) B × vocab {v:,} × "
            f"{n:,} tokens (transformers ForCausalLMLoss)")
    if kv_cache:
        text += f" + {human_bytes(kv_cache)} DynamicCache k/v"
    return MemoryTerm("loss forward: logits", (logit + upcast + 4) * v * n + 8 * n + kv_cache, text)


def _checkpoint_term(layers: int, act: int, hidden: int, n: int) -> MemoryTerm:
    return MemoryTerm("checkpointed layer inputs", layers * act * hidden * n,
                      f"{layers} layer{'s' if layers != 1 else ''} × {act} B × hidden {hidden:,} × {n:,} tokens "
                      "(each checkpoint keeps its layer's input)")


def _dora_transient_term(value: int) -> MemoryTerm:
    return MemoryTerm("DoRA weight-norm transient", value,
                      "4 B × (in² + in·r + 4·in·out) for the largest DoRA module: eye(in), B·A·eye, W in fp32, "
                      "scaling·BA and W + scaling·BA (dora.py get_lora_weight, get_weight_norm)")


def _backward_terms(step: _Step, layer: _LayerSaved, n: int, hidden: int, tail: int = 0) -> list[MemoryTerm]:
    """A layer's backward working set, approximate (it holds the peak only for small vocabularies):
    the hidden-state gradient plus the larger of an RMSNorm backward's fp32 temporaries, the
    MLP's intermediate gradients (of act·up, act and up, and the fp32 path of a LoRA on down) and the
    MoE block's largest moment (by then the `tail` kept after the layers, the final norm's, is freed)."""
    s, width = step.act, layer.mlp_width
    mlp = 3 * s * width + (ADAPTER_BYTES * width if layer.down_adapted else 0)
    moe = max((per_token * n + fixed for per_token, fixed in layer.moe_backward), default=tail) - tail
    value = s * hidden * n + max(4 * 4 * hidden * n, mlp * n, moe)
    text = f"max(norm 16·{hidden:,}, MLP {mlp:,}) B/token × {n:,} tokens"
    if layer.moe_backward:
        text = f"max(norm 16·{hidden:,} B/token × {n:,} tokens, MoE block {human_bytes(moe)})"
    return [MemoryTerm("backward working set", value, f"hidden-state gradient {s}·{hidden:,} B/token + {text} "
                                                      "(approximate)")]


@dataclass
class _Trainable:
    params: int
    bytes: int
    formula: str
    grad_bytes: int
    grad_dtype_bytes: int
    tensors: list[tuple[int, int]]  # (numel, bytes per element) of every trainable tensor
    full_lm_head: bool = False
    grad_by_layer: Counter = field(default_factory=Counter)  # layer index (or "lm_head") -> LoRA gradient bytes


def _trainable(structure: ModelStructure, plan: LoraPlan, counted, base: int, kbit: bool) -> _Trainable:
    """LoRA weights (fp32, PEFT's autocast_adapter_dtype) and anything else trained in full."""
    resolved = counted.targets
    rank_pattern = {**dict(plan.rank_pattern), **resolved.rank_pattern(plan.r, plan.alpha)[0]}
    tensors: list[tuple[int, int]] = []
    by_layer: Counter = Counter()
    for m in resolved.modules:
        r = rank_for(rank_pattern, plan.r, m.name)
        start = len(tensors)
        if m.kind == "conv":
            tensors += [(r * m.in_features * m.kernel, 4), (m.out_features * r, 4)]
        else:
            tensors += [(r * m.experts * m.in_features, 4), (r * m.experts * m.out_features, 4)]
        if plan.use_dora:
            tensors.append((m.out_features, 4))
        if plan.lora_bias:
            tensors.append((m.out_features, 4))
        key = "lm_head" if m.name == structure.output_embeddings else m.layer
        by_layer[key] += sum(n * b for n, b in tensors[start:])
    other = 4 if kbit else base  # biases and modules_to_save copies keep the base dtype (fp32 after kbit prep)
    if counted.bias_params:
        tensors.append((counted.bias_params, other))
    if counted.saved_params:
        tensors.append((counted.saved_params, other))
    params = sum(t[0] for t in tensors)
    total = sum(n * b for n, b in tensors)
    lora = counted.lora_params
    text = f"4 B × {lora:,} LoRA params (fp32: PEFT autocast_adapter_dtype)"
    if counted.bias_params or counted.saved_params:
        text += f" + {other} B × {counted.bias_params + counted.saved_params:,} params trained in full"
    full_lm_head = any(structure.output_embeddings and structure.output_embeddings.endswith(s)
                       for s in plan.modules_to_save)
    return _Trainable(params, total, text, total, 4, tensors, full_lm_head, by_layer)


def _optimizer_term(optimizer: str, t: _Trainable) -> MemoryTerm:
    if optimizer == "sgd":
        return MemoryTerm("optimizer state", 0, "SGD without momentum keeps no state")
    if optimizer == "adamw":
        total = sum(2 * n * b for n, b in t.tensors)
        return MemoryTerm("optimizer state", total,
                          f"AdamW exp_avg + exp_avg_sq in the parameter dtype: 2 × {human_bytes(t.bytes)} "
                          "(torch.optim.AdamW, from the first step on)")
    total = 0
    for n, _ in t.tensors:
        if n >= BNB8_MIN_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB8_BLOCK)
        else:
            total += 2 * 4 * n
    return MemoryTerm("optimizer state", total,
                      "bitsandbytes AdamW8bit: 2 × 1 B per element + fp32 absmax per 256 (tensors under "
                      "4096 elements keep 2 × 4 B)")


def nf4_bytes(numel: int, double_quant: bool, granule: int = ALLOC_GRANULE) -> int:
    """Bytes of one weight in bitsandbytes NF4 (quantize_4bit): two 4-bit codes per byte and an
    absmax per block of 64; with double quant the absmax are 8-bit codes with an fp32 absmax per
    256 of them, an fp32 offset and a 256-entry code table (QLoRA, Dettmers et al. 2023, §2).
    Each layer also keeps its 16-entry NF4 table; the small tensors round up to the allocator's
    512-byte granule."""
    blocks = math.ceil(numel / NF4_BLOCK)
    out = _round(math.ceil(numel / 2), granule) + _round(16 * 4, granule)
    if double_quant:
        out += _round(blocks, granule) + _round(4 * math.ceil(blocks / DQ_BLOCK), granule)
        out += _round(4, granule) + _round(256 * 4, granule)
    else:
        out += _round(4 * blocks, granule)
    return out


def _round(n: int, granule: int) -> int:
    return -(-n // granule) * granule


def _weight_terms(structure: ModelStructure, dtype: str, quant: str, double_quant: bool,
                  granule: int = ALLOC_GRANULE) -> list[MemoryTerm]:
    total = structure.total_params
    b = DTYPE_BYTES[dtype]
    if quant == "none":
        return [MemoryTerm("base weights", total * b,
                           f"{b} B × {total:,} params ({dtype}; tied embeddings counted once)")]
    quantized = [m for m in structure.modules
                 if m.kind in ("linear", "conv1d") and m.name != structure.output_embeddings
                 and f"{m.name}.weight" not in structure.tied]
    q_params = sum(m.in_features * m.out_features for m in quantized)
    rest = total - q_params
    rest_term = MemoryTerm("base weights: not quantized (fp32)", 4 * rest,
                           f"4 B × {rest:,} params: embeddings, norms, lm_head, biases stay 16-bit in "
                           "bitsandbytes and prepare_model_for_kbit_training casts them to fp32")
    if quant == "4bit":
        data = sum(math.ceil(m.in_features * m.out_features / 2) for m in quantized)
        consts = sum(nf4_bytes(m.in_features * m.out_features, double_quant, granule) for m in quantized) - data
        how = ("8-bit absmax per 64 + fp32 absmax per 256 blocks (double quant)" if double_quant
               else "fp32 absmax per block of 64")
        return [
            MemoryTerm("base weights: NF4 data", data, f"0.5 B × {q_params:,} params of {len(quantized)} Linear layers"),
            MemoryTerm("base weights: NF4 constants", consts, how),
            rest_term,
        ]
    scb = sum(4 * m.out_features for m in quantized)
    return [
        MemoryTerm("base weights: int8", q_params + scb,
                   f"1 B × {q_params:,} params + fp32 scale per output row (LLM.int8, Dettmers et al. 2022)"),
        rest_term,
    ]


def _expert_copy_note(layers: list[_LayerSaved], grad_ckpt: bool) -> list[str]:
    copies = sum(x.fixed[_EXPERTS_FIXED] for x in layers)
    if not copies:
        return []
    if grad_ckpt:
        return ["PEFT's expert path (lora.ParamWrapper) makes a W + ΔW copy of each adapted expert stack; with "
                "checkpointing only the layer being recomputed holds one"]
    return [f"PEFT's expert path (lora.ParamWrapper) keeps a W + ΔW copy of every adapted expert stack until backward: "
            f"{human_bytes(copies)} here; gradient checkpointing (--grad-ckpt) keeps one layer's at a time"]


def _notes(step: _Step, structure: ModelStructure, quant: str) -> list[str]:
    shape = step.shape
    notes = []
    if quant != "none":
        notes.append("prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, so without "
                     "autocast every activation is fp32 (twice bf16)")
    if step.kernel == "math":
        why = "fp32" if step.act == 4 else "head_dim > 256"
        gqa = " with grouped KV heads" if shape.kv_heads != shape.heads else ""
        notes.append(f"SDPA falls back to its math kernel ({why}{gqa}), which keeps B·H·L·L fp32 attention "
                     "probabilities per layer; flash attention needs bf16/fp16 inputs (e.g. bf16 autocast)")
    if quant == "8bit":
        notes.append("the 8-bit (LLM.int8) terms follow bitsandbytes' code but were not measured on a GPU")
    if structure.model_type not in _VALIDATED:
        notes.append(f"activations are walked for a pre-norm decoder; the GPU check covered Llama, not "
                     f"{structure.model_type or structure.architecture}: read the activation terms as approximate")
    if shape.moe and structure.model_type not in _MOE_CHECKED:
        notes.append(f"MoE blocks are walked as transformers' grouped_mm experts with qwen3_moe's and mixtral's "
                     f"router (checked against autograd); {structure.model_type}'s router or shared experts may keep "
                     "somewhat more")
    elif any(m.role == "experts" for m in structure.modules) and not shape.moe:
        notes.append("MoE expert activations are not modeled for this layout: read the total as a lower bound")
    notes.append(f"max_memory_allocated leaves out the CUDA context (~{human_bytes(CUDA_CONTEXT_BYTES)}); the "
                 f"verdict adds it and a {ALLOCATOR_MARGIN:.0%} allocator margin")
    return notes


_VALIDATED = {"llama"}
_MOE_CHECKED = {"qwen3_moe", "mixtral"}  # tests/test_memory.py: saved tensors and step peaks on the CPU


def memory(model, targets="all-linear", rank: int = 8, batch_size: int = 1, seq_len: int = 2048, **kwargs) -> MemoryEstimate:
    """`loraplan memory` as a function: the estimate for MODEL (a path, Hub id, builtin:NAME or a
    ModelStructure) with a LoRA of `targets` and `rank`.

    Keyword arguments: alpha, dora, rslora, layers, dropout, plan (a LoraPlan instead of the plan
    flags), dtype, quant, double_quant, grad_ckpt, optimizer, gpu_memory ("24GiB" or bytes),
    trust_remote_code.
    """
    from ..model.loading import load_structure

    plan_keys = {"alpha": "lora_alpha", "dora": "use_dora", "rslora": "use_rslora", "layers": "layers",
                 "dropout": "lora_dropout"}
    plan = kwargs.pop("plan", None)
    plan_fields = {plan_keys[k]: kwargs.pop(k) for k in list(kwargs) if k in plan_keys}
    gpu = kwargs.pop("gpu_memory", None)
    trust = kwargs.pop("trust_remote_code", False)
    allowed = {"dtype", "quant", "double_quant", "grad_ckpt", "optimizer"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        hint = did_you_mean(unknown[0], allowed | set(plan_keys) | {"plan", "gpu_memory"})
        raise UsageError(f"memory() got unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}", hint)
    if plan is None:
        if not isinstance(targets, str):
            targets = ",".join(targets)
        if isinstance(plan_fields.get("layers"), (list, tuple)):
            plan_fields["layers"] = ",".join(str(x) for x in plan_fields["layers"])
        plan = LoraPlan(targets=targets, r=rank, **plan_fields)
    elif plan_fields:
        plan = replace(plan, **plan_fields)
    structure = model if isinstance(model, ModelStructure) else load_structure(model, trust_remote_code=trust)
    estimate = estimate_memory(structure, plan, batch_size, seq_len, **kwargs)
    if gpu is not None:
        estimate.gpu_bytes = gpu if isinstance(gpu, int) and not isinstance(gpu, bool) else parse_size(gpu)
    return estimate
