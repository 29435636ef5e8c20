"""Look: what a model is to LoRA. Built-in shapes, loading configs, models and tokenizers, the
module structure read off the real class on the `meta` device, roles, the target grammar, inspect."""
