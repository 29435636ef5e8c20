"""Built-in model shapes (`builtin:NAME`), for offline use.

Each entry is the model's own `config.json` from its Hub repository, reduced to the keys that
decide the module tree. The structure is still built by instantiating the real transformers class
on the `meta` device; this table only saves the download. `tests/test_catalog.py` checks every
entry's total parameter count against the figure its publisher reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError, did_you_mean, listing


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    hub_id: str
    total_params: int  # the publisher's figure (safetensors metadata), checked by the tests
    config: dict = field(repr=False)


def _llama(hidden, inter, layers, heads, kv, vocab=128256, tie=False, **extra):
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tie,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        bos_token_id=128000, eos_token_id=128001, **extra,
    )


def _qwen2(hidden, inter, layers, heads, kv, vocab, tie):
    return dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tie,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        bos_token_id=151643, eos_token_id=151643,
    )


def _qwen3(hidden, inter, layers, heads, kv, tie):
    return dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=128, vocab_size=151936, tie_word_embeddings=tie,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        bos_token_id=151643, eos_token_id=151645,
    )


_ENTRIES = [
    BuiltinModel("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 1_235_814_400,
                 _llama(2048, 8192, 16, 32, 8, tie=True, head_dim=64)),
    BuiltinModel("llama-3.2-3b", "meta-llama/Llama-3.2-3B", 3_212_749_824,
                 _llama(3072, 8192, 28, 24, 8, tie=True, head_dim=128)),
    BuiltinModel("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 8_030_261_248,
                 _llama(4096, 14336, 32, 32, 8)),
    BuiltinModel("llama-3.1-70b", "meta-llama/Llama-3.1-70B", 70_553_706_496,
                 _llama(8192, 28672, 80, 64, 8)),
    BuiltinModel("llama-3.1-405b", "meta-llama/Llama-3.1-405B", 405_853_388_800,
                 _llama(16384, 53248, 126, 128, 8)),
    BuiltinModel("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1_100_048_384,
                 dict(_llama(2048, 5632, 22, 32, 4, vocab=32000), bos_token_id=1, eos_token_id=2,
                      max_position_embeddings=2048, rope_theta=10000.0)),
    BuiltinModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 134_515_008,
                 dict(_llama(576, 1536, 30, 9, 3, vocab=49152, tie=True), bos_token_id=0,
                      eos_token_id=0, max_position_embeddings=8192, rope_theta=100000.0)),
    BuiltinModel("mistral-7b", "mistralai/Mistral-7B-v0.3", 7_248_023_552, dict(
        model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
        sliding_window=None, bos_token_id=1, eos_token_id=2)),
    BuiltinModel("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 494_032_768,
                 _qwen2(896, 4864, 24, 14, 2, 151936, True)),
    BuiltinModel("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", 1_543_714_304,
                 _qwen2(1536, 8960, 28, 12, 2, 151936, True)),
    BuiltinModel("qwen2.5-7b", "Qwen/Qwen2.5-7B", 7_615_616_512,
                 _qwen2(3584, 18944, 28, 28, 4, 152064, False)),
    BuiltinModel("qwen2.5-72b", "Qwen/Qwen2.5-72B", 72_706_203_648,
                 _qwen2(8192, 29568, 80, 64, 8, 152064, False)),
    BuiltinModel("qwen3-0.6b", "Qwen/Qwen3-0.6B", 596_049_920,
                 _qwen3(1024, 3072, 28, 16, 8, True)),
    BuiltinModel("qwen3-8b", "Qwen/Qwen3-8B", 8_190_735_360,
                 _qwen3(4096, 12288, 36, 32, 8, False)),
    BuiltinModel("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", 30_532_122_624, dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        bos_token_id=151643, eos_token_id=151645)),
    BuiltinModel("gemma-2-2b", "google/gemma-2-2b", 2_614_341_888, dict(
        model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=2304,
        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
        max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    BuiltinModel("gemma-2-9b", "google/gemma-2-9b", 9_241_705_984, dict(
        model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=3584,
        intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
        max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    BuiltinModel("gemma-3-1b", "google/gemma-3-1b-pt", 999_885_952, dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=1152,
        intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, tie_word_embeddings=True,
        max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    BuiltinModel("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", 3_821_079_552, dict(
        model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        pad_token_id=32000, bos_token_id=1, eos_token_id=32000)),
    BuiltinModel("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 46_702_792_704, dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, bos_token_id=1, eos_token_id=2)),
    BuiltinModel("gpt2", "openai-community/gpt2", 124_439_808, dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=768, n_layer=12,
        n_head=12, n_positions=1024, vocab_size=50257, bos_token_id=50256, eos_token_id=50256)),
    BuiltinModel("pythia-160m", "EleutherAI/pythia-160m", 162_322_944, dict(
        model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=768,
        intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=50304,
        rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)),
    BuiltinModel("pythia-1b", "EleutherAI/pythia-1b", 1_011_781_632, dict(
        model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8, vocab_size=50304,
        rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)),
    BuiltinModel("falcon-7b", "tiiuae/falcon-7b", 6_921_720_704, dict(
        model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=4544,
        num_hidden_layers=32, num_attention_heads=71, multi_query=True,
        new_decoder_architecture=False, parallel_attn=True, bias=False, alibi=False,
        vocab_size=65024, tie_word_embeddings=True, bos_token_id=11, eos_token_id=11)),
]

BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in _ENTRIES}
_BY_HUB_ID = {m.hub_id.lower(): m for m in _ENTRIES}


def get_builtin(name: str) -> BuiltinModel:
    key = name.strip().lower()
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    if key in _BY_HUB_ID:
        return _BY_HUB_ID[key]
    hint = did_you_mean(key, BUILTIN_MODELS) or f"built-in models: {listing(BUILTIN_MODELS, 30)}"
    raise UsageError(f"unknown built-in model '{name}'", hint)


def builtin_for_hub_id(hub_id: str) -> BuiltinModel | None:
    return _BY_HUB_ID.get(hub_id.lower())

