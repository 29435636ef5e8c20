"""`loraplan memory`: term arithmetic by hand, activations against autograd's saved tensors, the
whole step's peak against a CPU allocation tracker, monotonicity, the verdict, the CLI."""

from __future__ import annotations

import json
import math
import weakref

import pytest

from loraplan.cli import main
from loraplan.errors import UsageError
from loraplan.plan.lora_plan import LoraPlan
from loraplan.plan.memory import (
    CUDA_CONTEXT_BYTES,
    GiB,
    MiB,
    Runtime,
    estimate_memory,
    memory,
    nf4_bytes,
    parse_size,
    sdpa_kernel,
)

# On the CPU, dropout keeps an fp32 noise tensor instead of CUDA's bool mask, and SDPA runs its
# flash kernel (q, k, v, output, logsumexp: what flash/cuDNN keep on the GPU).
CPU = Runtime(mask_bytes=4, attention="fused")
LLAMA_1B = "builtin:llama-3.2-1b"


def term(estimate, name: str) -> int:
    return sum(t.bytes for t in estimate.terms if t.name == name)


# -- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * GiB), ("24GB", 24 * GiB), ("80G", 80 * GiB), ("24", 24 * GiB),
    ("40960MiB", 40 * GiB), ("1.5 TB", int(1.5 * 1024 * GiB)), ("512mb", 512 * MiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "24 GiBs", "-4GB", "0", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


# -- term arithmetic, by hand ------------------------------------------------------------------------


def test_terms_by_hand_llama_1b_qv():
    n = 4 * 512
    e = memory(LLAMA_1B, targets="qv", rank=8, batch_size=4, seq_len=512)
    d, kv, i, v, r = 2048, 512, 8192, 128256, 8
    lora = 16 * r * ((d + d) + (d + kv))  # A r×in + B out×r for q and v, 16 layers
    assert term(e, "base weights") == 2 * 1_235_814_400  # tied embeddings once
    assert term(e, "LoRA weights") == 4 * lora
    assert term(e, "optimizer state") == 2 * 4 * lora
    assert term(e, "loss: log_softmax output") == 4 * v * n + 8 * n
    assert term(e, "loss backward: logit gradients") == 2 * 4 * v * n
    # per token: RMSNorm 4d+4; SDPA 2·(2d + 2kv) + 4·heads; MLP 3·2·i; each LoRA input 4·in + 1·in (mask) + 4r
    norm, attn, mlp, lora_in = 4 * d + 4, 2 * (2 * d + 2 * kv) + 4 * 32, 3 * 2 * i, 5 * d + 4 * r
    first = norm + attn + mlp + 2 * (4 * d + 4 * r)  # layer 0: its input needs no grad: no first norm, no masks
    rest = 2 * norm + attn + mlp + 2 * lora_in
    per_token = first + 15 * rest + norm  # + the final norm
    rope = 2 * 2 * 512 * 64
    assert e.saved_bytes - (4 * v * n + 8 * n) - rope == per_token * n
    assert e.peak_phase == "loss backward"
    assert e.total_bytes == sum(t.bytes for t in e.terms) == max(e.phases.values())


def test_qlora_weights_by_hand():
    e = memory(LLAMA_1B, targets="qv", quant="4bit", double_quant=False)
    linear = 16 * (2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192)
    assert term(e, "base weights: NF4 data") == linear // 2
    rest = 1_235_814_400 - linear  # embeddings (tied to lm_head) and norms, cast to fp32 by prepare
    assert term(e, "base weights: not quantized (fp32)") == 4 * rest
    per_module_consts = 16 * 7 * 512  # the 16-entry NF4 table, one 512-byte block each
    assert term(e, "base weights: NF4 constants") == 4 * linear // 64 + per_module_consts


def test_nf4_bytes_by_hand():
    n = 4096 * 4096
    blocks = n // 64
    assert nf4_bytes(n, double_quant=False, granule=1) == n // 2 + 4 * blocks + 64
    # double quant: 8-bit absmax, fp32 absmax per 256 of them, fp32 offset, 256-entry fp32 code
    assert nf4_bytes(n, double_quant=True, granule=1) == n // 2 + blocks + 4 * (blocks // 256) + 4 + 1024 + 64
    assert nf4_bytes(n, True) < nf4_bytes(n, False)


def test_optimizers():
    kwargs = dict(targets="all-linear", rank=16, batch_size=1, seq_len=256)
    adam = memory(LLAMA_1B, **kwargs)
    adam8 = memory(LLAMA_1B, optimizer="adamw8bit", **kwargs)
    sgd = memory(LLAMA_1B, optimizer="sgd", **kwargs)
    lora = term(adam, "LoRA weights")
    assert term(adam, "optimizer state") == 2 * lora
    assert term(sgd, "optimizer state") == 0
    assert 0.50 * lora < term(adam8, "optimizer state") < 0.51 * lora  # 2 × 1 B + absmax per 256 vs 4 B


@pytest.mark.parametrize("act, heads, kv, hd, kernel", [
    (2, 32, 8, 128, "fused"),   # bf16 GQA: flash
    (2, 32, 8, 512, "math"),    # head_dim > 256 with GQA: no fused kernel takes it
    (4, 32, 32, 128, "fused"),  # fp32 without GQA: memory-efficient
    (4, 32, 8, 64, "math"),     # fp32 with GQA (QLoRA's fp32 stream): math
])
def test_sdpa_kernel(act, heads, kv, hd, kernel):
    assert sdpa_kernel(act, heads, kv, hd) == kernel


# -- monotonicity -----------------------------------------------------------------------------------


def test_more_rank_batch_seq_more_memory():
    base = memory(LLAMA_1B, targets="attention", rank=8, batch_size=2, seq_len=512)
    assert memory(LLAMA_1B, targets="attention", rank=64, batch_size=2, seq_len=512).total_bytes > base.total_bytes
    assert memory(LLAMA_1B, targets="attention", rank=8, batch_size=4, seq_len=512).total_bytes > base.total_bytes
    assert memory(LLAMA_1B, targets="attention", rank=8, batch_size=2, seq_len=1024).total_bytes > base.total_bytes
    assert memory(LLAMA_1B, targets="all-linear", rank=8, batch_size=2, seq_len=512).total_bytes > base.total_bytes
    assert memory(LLAMA_1B, targets="attention", rank=8, batch_size=2, seq_len=512, dora=True).total_bytes \
        > base.total_bytes


def test_checkpointing_lowers_activations():
    plain = memory(LLAMA_1B, targets="all-linear", batch_size=4, seq_len=1024)
    ckpt = memory(LLAMA_1B, targets="all-linear", batch_size=4, seq_len=1024, grad_ckpt=True)
    assert ckpt.saved_bytes < plain.saved_bytes / 4
    assert ckpt.total_bytes < plain.total_bytes
    assert term(ckpt, "checkpointed layer inputs") == 16 * 2 * 2048 * 4 * 1024


def test_qlora_lowers_weights_but_not_activations():
    plain = memory(LLAMA_1B, targets="qv", batch_size=1, seq_len=1024)
    qlora = memory(LLAMA_1B, targets="qv", batch_size=1, seq_len=1024, quant="4bit")
    weights = lambda e: sum(t.bytes for t in e.terms if t.name.startswith("base weights"))  # noqa: E731
    assert weights(qlora) < weights(plain) / 1.5
    # prepare_model_for_kbit_training makes the residual stream fp32: SDPA's math kernel, more activations
    assert qlora.saved_bytes > plain.saved_bytes
    assert any("math kernel" in note for note in qlora.notes)


# -- the verdict --------------------------------------------------------------------------------------


def test_fits_includes_context_and_margin():
    e = memory(LLAMA_1B, targets="qv", batch_size=1, seq_len=512)
    assert e.fits(e.needed_bytes) and not e.fits(e.needed_bytes - 1)
    assert e.needed_bytes > e.total_bytes + CUDA_CONTEXT_BYTES
    assert e.suggestions(e.needed_bytes) == []


def test_suggestions_are_checked():
    e = memory("builtin:llama-3.1-8b", targets="all-linear", rank=16, batch_size=8, seq_len=1024, gpu_memory="40GB")
    assert not e.fits(40 * GiB)
    tips = e.suggestions(40 * GiB)
    assert any("--grad-ckpt" in tip for tip in tips)
    assert e.with_options(grad_ckpt=True).fits(40 * GiB)
    batch_tip = next(t for t in tips if t.startswith("--batch-size"))
    batch = int(batch_tip.split()[1].rstrip(","))
    assert e.with_options(batch_size=batch).fits(40 * GiB)
    assert not e.with_options(batch_size=batch + 1).fits(40 * GiB)
    assert "suggestions" in e.to_json()


def test_nothing_fits_says_so():
    e = memory("builtin:llama-3.1-8b", targets="qv", batch_size=1, seq_len=128)
    assert "nothing fits" in e.suggestions(2 * GiB)[0]


# -- activations against autograd, peak against a CPU allocation tracker --------------------------------


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


# Tiny MoE layouts of transformers 5 (fused 3-D experts, grouped_mm): Qwen3-MoE casts the routing
# weights back to bf16, Mixtral keeps them fp32.
TINY_QWEN_MOE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                     num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, vocab_size=256, norm_topk_prob=True, max_position_embeddings=256)
TINY_MIXTRAL = dict(hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                    max_position_embeddings=256)
# Wide experts and a small vocabulary: the MoE block's backward, not the loss, holds the peak.
WIDE_EXPERTS = dict(vocab_size=32, intermediate_size=384, moe_intermediate_size=384)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM", TINY),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", TINY_QWEN_MOE),
            "mixtral": ("MixtralConfig", "MixtralForCausalLM", TINY_MIXTRAL)}


def _tiny_peft(plan: LoraPlan, dtype: str = "bf16", family: str = "llama", **config_changes):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from loraplan.model.structure import read_structure

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config_cls, model_cls, base = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**base, **config_changes})
    model = getattr(transformers, model_cls)._from_config(
        config, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], attn_implementation="sdpa")
    structure = read_structure(model, source=f"tiny-{family}")
    model = get_peft_model(model, LoraConfig(**plan.to_peft_kwargs(structure)))
    model.train()
    return model, structure


def _saved_by_autograd(model, ids, backend) -> int:
    """Bytes of the distinct storages autograd keeps after the forward (parameters excluded)."""
    import torch
    from torch.nn.attention import sdpa_kernel as force

    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with force(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive = {}
    for ref in refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(alive.values())


@pytest.mark.parametrize("targets, dtype, extra", [
    ("qv", "bf16", {}),
    ("all-linear", "bf16", {}),
    ("down", "bf16", {}),
    ("all-linear", "bf16", {"lora_dropout": 0.0}),
    ("all-linear", "fp32", {}),
    ("q,v", "fp32", {"lora_dropout": 0.0}),
    ("attention", "bf16", {"use_dora": True}),
    ("all-linear", "bf16", {"use_dora": True, "lora_dropout": 0.0}),
    ("all-linear", "bf16", {"layers": "1-2"}),
    ("all", "bf16", {}),
])
def test_activations_equal_autograd_saved_tensors(targets, dtype, extra):
    import torch
    from torch.nn.attention import SDPBackend

    plan = LoraPlan(targets=targets, r=4, **extra)
    model, structure = _tiny_peft(plan, dtype)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32))
    measured = _saved_by_autograd(model, ids, SDPBackend.FLASH_ATTENTION)
    estimate = estimate_memory(structure, plan, 2, 32, dtype=dtype, runtime=CPU)
    assert abs(measured - estimate.saved_bytes) <= 4  # nll_loss's scalar total_weight


@pytest.mark.parametrize("targets", ["qv", "k", "all-linear"])
def test_math_attention_equals_autograd_saved_tensors(targets):
    import torch
    from torch.nn.attention import SDPBackend

    plan = LoraPlan(targets=targets, r=4)
    model, structure = _tiny_peft(plan, "bf16")
    ids = torch.randint(0, TINY["vocab_size"], (2, 32))
    measured = _saved_by_autograd(model, ids, SDPBackend.MATH)
    estimate = estimate_memory(structure, plan, 2, 32, runtime=Runtime(mask_bytes=4, attention="math"))
    assert abs(measured - estimate.saved_bytes) <= 4


def _peak_of_steps(model, batch: int, seq: int, steps: int = 2) -> int:
    """Peak bytes of every tensor created during `steps` training steps, tracked op by op: what
    max_memory_allocated sees once the model is loaded (the second step has the optimizer state)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Tracker(TorchDispatchMode):
        def __init__(self, known):
            super().__init__()
            self.known, self.live, self.peak, self.sizes = known, 0, 0, {}

        def _free(self, key):
            self.live -= self.sizes.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self.sizes and key not in self.known:
                        self.sizes[key] = storage.nbytes()
                        self.live += storage.nbytes()
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(storage, self._free, key)
            return out

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with Tracker(known) as tracker:
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (batch, seq))
            labels = ids.clone()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, ids, labels
    return tracker.peak


@pytest.mark.parametrize("targets, extra, ckpt, tolerance", [
    ("all-linear", {}, False, 0.01),
    ("attention", {"use_dora": True}, False, 0.01),
    ("qv", {}, True, 0.01),
    ("all-linear", {}, True, 0.06),  # the recompute + backward moment is modeled approximately
])
def test_peak_of_a_training_step(targets, extra, ckpt, tolerance):
    plan = LoraPlan(targets=targets, r=4, **extra)
    model, structure = _tiny_peft(plan, "bf16")
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    measured = _peak_of_steps(model, 2, 32)
    estimate = estimate_memory(structure, plan, 2, 32, grad_ckpt=ckpt, runtime=CPU)
    loaded = ("base weights", "LoRA weights", "cuBLAS workspaces")  # allocated before the steps, or CUDA-only
    predicted = estimate.total_bytes - sum(t.bytes for t in estimate.terms if t.name in loaded)
    assert math.isclose(predicted, measured, rel_tol=tolerance), (predicted, measured, estimate.peak_phase)


# PEFT's `all-linear` on these MoE models: attention, the router and the fused experts, gate_up at 2r
# (peft/utils/transformers_weight_conversion.py); spelled out so the plan is the same on any loraplan
MOE_ALL_LINEAR = dict(targets="attention,experts,router", rank_pattern={"gate_up_proj": 8})


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("targets, extra", [
    ("attention", {}),  # frozen experts: the routed activations and the router's softmax
    ("experts", {}),  # layer 0's input needs no grad: W + ΔW is not kept there, the expert inputs are
    ("attention,experts,router", {"rank_pattern": {"gate_up_proj": 8}}),
    ("router", {}),
    ("q", {}),
])
def test_moe_activations_equal_autograd_saved_tensors(family, targets, extra):
    import torch
    from torch.nn.attention import SDPBackend

    plan = LoraPlan(targets=targets, r=4, lora_dropout=0.0, **extra)
    model, structure = _tiny_peft(plan, family=family)
    ids = torch.randint(0, 256, (2, 32))
    measured = _saved_by_autograd(model, ids, SDPBackend.FLASH_ATTENTION)
    estimate = estimate_memory(structure, plan, 2, 32, runtime=CPU)
    assert abs(measured - estimate.saved_bytes) <= 4


def test_moe_peft_all_linear_keeps_what_the_estimate_says():
    """PEFT reading `target_modules="all-linear"` itself, with the plan spelled out for the estimate."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.nn.attention import SDPBackend

    plan = LoraPlan(r=4, lora_dropout=0.0, **MOE_ALL_LINEAR)
    model, structure = _tiny_peft(plan, family="qwen3_moe")
    base = model.unload()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    from loraplan.plan.count import count_plan

    assert model.get_nb_trainable_parameters()[0] == count_plan(structure, plan).trainable_params
    measured = _saved_by_autograd(model, torch.randint(0, 256, (2, 32)), SDPBackend.FLASH_ATTENTION)
    assert abs(measured - estimate_memory(structure, plan, 2, 32, runtime=CPU).saved_bytes) <= 4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("targets, extra, config, ckpt, phase", [
    ("attention", {}, WIDE_EXPERTS, False, "last layer backward"),  # act·up's backward
    ("all-linear", MOE_ALL_LINEAR, WIDE_EXPERTS, False, "last layer backward"),  # ΔW's gradient of down
    ("all-linear", MOE_ALL_LINEAR, {}, False, "loss backward"),
    ("experts", {}, WIDE_EXPERTS, True, "layer recompute + backward"),
    ("all-linear", MOE_ALL_LINEAR, {}, True, "layer recompute + backward"),  # the later layers' LoRA gradients
])
def test_moe_peak_of_a_training_step(family, targets, extra, config, ckpt, phase):
    extra = {"targets": targets, **extra}
    plan = LoraPlan(r=4, lora_dropout=0.0, **extra)
    model, structure = _tiny_peft(plan, family=family, **config)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    measured = _peak_of_steps(model, 2, 32)
    estimate = estimate_memory(structure, plan, 2, 32, grad_ckpt=ckpt, runtime=CPU)
    loaded = ("base weights", "LoRA weights", "cuBLAS workspaces")
    predicted = estimate.total_bytes - sum(t.bytes for t in estimate.terms if t.name in loaded)
    assert estimate.peak_phase == phase
    # checkpointing: the recompute + backward moment is modeled approximately
    assert math.isclose(predicted, measured, rel_tol=0.02 if ckpt else 0.01), (predicted, measured)


@pytest.mark.slow
def test_moe_peak_in_the_fp32_routing_weight_backward():
    """Mixtral multiplies the expert outputs by fp32 routing weights: with a wide hidden size the
    gradient of that product (fp32, a product per input and the cast back) holds the peak."""
    plan = LoraPlan(targets="attention", r=4, lora_dropout=0.0)
    model, structure = _tiny_peft(plan, family="mixtral", vocab_size=32, hidden_size=256, intermediate_size=32)
    measured = _peak_of_steps(model, 2, 32)
    estimate = estimate_memory(structure, plan, 2, 32, runtime=CPU)
    predicted = estimate.total_bytes - sum(t.bytes for t in estimate.terms
                                           if t.name in ("base weights", "LoRA weights", "cuBLAS workspaces"))
    assert estimate.peak_phase == "last layer backward"
    assert math.isclose(predicted, measured, rel_tol=0.01), (predicted, measured)


def test_moe_terms_by_hand_qwen3_30b_a3b():
    """12 layers of Qwen3-30B-A3B (E = 128, top-8, H = 2048, I = 768), bf16, 1 × 2048 tokens."""
    from loraplan.model.loading import load_structure, make_config, read_config_dict
    from loraplan.model.structure import build_structure

    config = read_config_dict("builtin:qwen3-30b-a3b")[0]
    structure = build_structure(make_config({**config, "num_hidden_layers": 12}), source="qwen3-30b-a3b x12")
    n, E, k, H, I, r = 2048, 128, 8, 2048, 768, 16
    frozen = estimate_memory(structure, LoraPlan(targets="attention", r=r, lora_dropout=0.0), 1, n)
    # per routed copy: gate_up output 2I, act(gate) I, down output H (bf16), 3 int64 indices, the mask,
    # the bf16 routing weight; per token the fp32 softmax over E, the top-k indices, values and sum
    routed = k * (2 * (2 * I + I + H) + 3 * 8 + 1 + 2)
    router = 4 * E + 8 * k + 4 * k + 4
    assert term(frozen, "MoE experts (activations, 12 layers)") == 12 * routed * n
    assert term(frozen, "MoE router (activations, 12 layers)") == 12 * router * n
    adapted = estimate_memory(structure, LoraPlan(r=r, lora_dropout=0.0, targets="attention,experts,router",
                                                  rank_pattern={"gate_up_proj": 2 * r}), 1, n)
    copies = 2 * E * (2 * I * H + H * I) + 2 * E * H  # W + ΔW of gate_up, down and the router
    factors = 2 * E * (2 * r * (H + 2 * I) + r * (I + H))  # the bf16 B and A baddbmm keeps
    assert term(adapted, "experts: W + ΔW copies (PEFT ParamWrapper)") == 12 * (copies + factors)
    assert adapted.total_bytes > frozen.total_bytes + 12 * copies


def test_qlora_weights_and_activations_with_bitsandbytes(tmp_path):
    """bitsandbytes' CPU backend quantizes like the GPU one: weights and saved tensors exactly."""
    pytest.importorskip("bitsandbytes")
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch.nn.attention import SDPBackend

    from loraplan.model.structure import read_structure
    from loraplan.plan.memory import _weight_terms

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 256})
    transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu",
                                                          dtype=torch.bfloat16, attn_implementation="sdpa")
    structure = read_structure(transformers.LlamaForCausalLM._from_config(config), source="tiny")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    storages = {}
    for p in model.parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    weights = sum(t.bytes for t in _weight_terms(structure, "bf16", "4bit", True, granule=1))
    assert sum(storages.values()) == weights
    plan = LoraPlan(targets="all-linear", r=4)
    model = get_peft_model(model, LoraConfig(**plan.to_peft_kwargs(structure)))
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 32))
    measured = _saved_by_autograd(model, ids, SDPBackend.FLASH_ATTENTION)
    estimate = estimate_memory(structure, plan, 2, 32, quant="4bit", runtime=CPU)
    assert abs(measured - estimate.saved_bytes) <= 4


# -- CLI ----------------------------------------------------------------------------------------------------


def test_cli_table_and_verdict(capsys):
    code = main(["memory", LLAMA_1B, "--targets", "qv", "--rank", "16", "--batch-size", "4", "--seq-len", "512",
                 "--gpu-memory", "8GB"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("base weights", "LoRA inputs", "loss backward: logit gradients", "predicted peak",
                 "does NOT fit on 8.0 GiB", "--grad-ckpt"):
        assert text in out


def test_cli_json(capsys):
    assert main(["memory", LLAMA_1B, "-t", "all-linear", "-r", "8", "-b", "2", "-l", "256", "--quant", "4bit",
                 "--grad-ckpt", "--gpu-memory", "24GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["suggestions"] == []
    assert data["total_bytes"] == sum(t["bytes"] for t in data["terms"])
    assert data["quant"] == "4bit" and data["grad_ckpt"] is True and data["gpu_bytes"] == 24 * GiB
    assert data["predicts"] == "torch.cuda.max_memory_allocated"


@pytest.mark.parametrize("args, message", [
    (["--dtype", "bf32"], "unknown dtype 'bf32'"),
    (["--quant", "3bit"], "unknown quantization '3bit'"),
    (["--optimizer", "adam8bit"], "unknown optimizer 'adam8bit'"),
    (["--batch-size", "0"], "argument --batch-size/-b: expected a positive integer"),
    (["--seq-len", "-5"], "argument --seq-len/-l: expected a positive integer"),
    (["--gpu-memory", "lots"], "cannot read the GPU memory size 'lots'"),
    (["--lora-dropout", "1.5"], "argument --lora-dropout: expected a number in [0, 1)"),
    (["--no-double-quant"], "--no-double-quant applies to --quant 4bit only"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    assert main(["memory", LLAMA_1B, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_api_rejects_unknown_argument():
    with pytest.raises(UsageError, match="unknown argument"):
        memory(LLAMA_1B, grad_checkpointing=True)
    with pytest.raises(UsageError, match="batch size"):
        memory(LLAMA_1B, batch_size=0)


# -- the GPU benchmark's design and comparison (no GPU needed) -----------------------------------------


def _benchmark(name: str):
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks" / "memory")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


@pytest.mark.parametrize("qlora", [False, True])
def test_benchmark_design_covers_every_pair(qlora):
    import itertools

    from loraplan.model.loading import load_structure

    measure = _benchmark("measure")
    configs = measure.design(load_structure("builtin:llama-3.1-8b"), qlora, 80 * GiB)
    factors = {
        "targets": lambda c: c.targets, "r": lambda c: c.r, "shape": lambda c: (c.batch_size, c.seq_len),
        "ckpt": lambda c: c.grad_ckpt, "dora": lambda c: c.dora,
    }
    if qlora:
        factors["dq"] = lambda c: c.double_quant
    levels = {k: {f(c) for c in configs} for k, f in factors.items()}
    assert all(len(v) >= 2 for v in levels.values())
    for (a, fa), (b, fb) in itertools.combinations(factors.items(), 2):
        seen = {(fa(c), fb(c)) for c in configs}
        wanted = set(itertools.product(levels[a], levels[b]))
        if qlora and {a, b} == {"targets", "dora"} or qlora and {a, b} == {"r", "dora"}:
            wanted -= {("all-linear", True), (64, True), (True, "all-linear"), (True, 64)}
        assert wanted <= seen, (a, b, wanted - seen)
    assert len(configs) == (8 if qlora else 18)


def test_compare_reports_errors_and_verdicts(tmp_path):
    compare = _benchmark("compare")
    e = memory(LLAMA_1B, targets="qv", rank=8, batch_size=1, seq_len=2048)
    env = {"device": "NVIDIA H100 80GB HBM3", "device_total_bytes": 85_000_000_000, "torch": "2.11.0"}
    config = {"targets": "qv", "r": 8, "batch_size": 1, "seq_len": 2048, "grad_ckpt": False, "dora": False,
              "quant": None, "double_quant": True}
    rows = [
        {"model": LLAMA_1B, "name": "qv r8 1x2048", "config": config, "status": "ok", "env": env,
         "allocated_peak": round(e.total_bytes / 1.05), "reserved_peak": e.total_bytes, "seconds": 1.0,
         "steps": [{}, {"before": 0, "after_forward": e.saved_bytes}]},
        {"model": LLAMA_1B, "name": "qv r8 8x1024", "env": env, "status": "oom", "error": "CUDA out of memory",
         "config": {**config, "batch_size": 8, "seq_len": 1024}, "allocated_peak": None, "reserved_peak": None},
    ]
    path = tmp_path / "memory_1b.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"truncated": ')
    report, worst = compare.build_report(compare.read_rows([path]))
    assert math.isclose(worst, 0.05, abs_tol=1e-6)
    assert "+5.0%" in report and "NVIDIA H100 80GB HBM3" in report and "did not run to the end" in report
    # the estimate says 8×1024 fits in 85 GB: a recorded OOM counts against the verdict
    assert "'right': 1" in report and "'said fits, ran out': 1" in report


def test_moe_benchmark_rows_are_estimated_as_recorded(tmp_path):
    """compare.py recomputes moe.py's rows with the same structure (a few layers) and plan."""
    compare, moe = _benchmark("compare"), _benchmark("moe")
    from loraplan.plan.lora_plan import LoraPlan

    model_id, layers = moe.MODELS["mixtral-8x7b"]
    structure = moe.structure_of(model_id)
    assert structure.num_layers == layers
    plan, peft = moe.plans(16)["all-linear"]
    e = estimate_memory(structure, LoraPlan(**plan), 1, 2048)
    config = {"targets": "all-linear", "r": 16, "batch_size": 1, "seq_len": 2048, "grad_ckpt": False, "dora": False,
              "quant": None, "double_quant": True, "layers": layers, "tiny": False, "plan": plan, "peft": peft}
    env = {"device": "NVIDIA H200", "device_total_bytes": 150_000_000_000}
    row = {"model": model_id, "name": "all-linear r16 1x2048", "config": config, "status": "ok", "env": env,
           "allocated_peak": round(e.total_bytes / 1.02), "reserved_peak": e.total_bytes, "seconds": 1.0}
    assert compare.estimate_row(row, {}).total_bytes == e.total_bytes
    report, worst = compare.build_report([row])
    assert math.isclose(worst, 0.02, abs_tol=1e-4) and "+2.0%" in report
