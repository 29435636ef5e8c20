"""Tiny configs of many families, built in the tests (random init, no downloads)."""

from __future__ import annotations

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], **COMMON),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], **COMMON),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], **COMMON),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16, **COMMON),
    "gemma": dict(model_type="gemma", architectures=["GemmaForCausalLM"], head_dim=16, **COMMON),
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16, **COMMON),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16, **COMMON),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, **COMMON),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=2, n_head=4,
                 n_positions=256, vocab_size=128, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], **COMMON),
    "falcon": dict(model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=64,
                   num_hidden_layers=2, num_attention_heads=4, vocab_size=128, bos_token_id=1, eos_token_id=2),
    "opt": dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=64, ffn_dim=128,
                word_embed_proj_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "bloom": dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=64, n_layer=2,
                  n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=3),
    "mpt": dict(model_type="mpt", architectures=["MptForCausalLM"], d_model=64, n_layers=2, n_heads=4,
                vocab_size=128, max_seq_len=256),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                    num_experts_per_tok=2, **COMMON),
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      **COMMON),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, **COMMON),
    "bert": dict(model_type="bert", architectures=["BertForMaskedLM"], hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, vocab_size=128, max_position_embeddings=256),
    "t5": dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=64, d_ff=128, d_kv=16,
               num_layers=2, num_heads=4, vocab_size=128, decoder_start_token_id=0),
    "t5_gated": dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=64, d_ff=128,
                     d_kv=16, num_layers=2, num_heads=4, vocab_size=128, feed_forward_proj="gated-gelu",
                     tie_word_embeddings=False, decoder_start_token_id=0),
    "phi": dict(model_type="phi", architectures=["PhiForCausalLM"], **COMMON),
    "starcoder2": dict(model_type="starcoder2", architectures=["Starcoder2ForCausalLM"], **COMMON),
    "deepseek_v3": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=64,
                        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=128, n_routed_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                        topk_group=1, max_position_embeddings=256),
}


# Families with no attention/MLP pair (so not in FAMILIES, whose tests count every role).
SPECIAL_FAMILIES: dict[str, dict] = {
    "mamba": dict(model_type="mamba", architectures=["MambaForCausalLM"], hidden_size=64, state_size=8,
                  num_hidden_layers=2, vocab_size=128, expand=2, conv_kernel=4),
    "ctrl": dict(model_type="ctrl", architectures=["CTRLLMHeadModel"], n_embd=64, dff=128, n_layer=2, n_head=4,
                 n_positions=256, vocab_size=128),
}


def make_config(family: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = dict(FAMILIES.get(family) or SPECIAL_FAMILIES[family])
    return CONFIG_MAPPING[data.pop("model_type")].from_dict(data)


def make_model(family: str, seed: int = 0):
    """A real (CPU, random-init) model of the family."""
    import torch
    import transformers

    config = make_config(family)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0])
    return cls._from_config(config)


def write_config(family: str, folder) -> str:
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(FAMILIES.get(family) or SPECIAL_FAMILIES[family]))
    return str(folder)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(vocab_size: int = 128):
    """A character-level fast tokenizer built in memory: <pad>=0, <s>=1, </s>=2, <unk>=3, then
    printable ASCII and the chat role markers; fits any tiny config with vocab_size >= 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in map(chr, range(32, 127)):
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=specials[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(folder, family: str = "llama", seed: int = 0) -> str:
    """A tiny model folder (config.json, model.safetensors, tokenizer) like save_pretrained writes."""
    from pathlib import Path

    folder = Path(folder)
    model = make_model(family, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return str(folder)
