"""PEFT adapters with a known ΔW, saved the way PEFT saves them: the oracle for analyze, compress
and merge."""

from __future__ import annotations

import torch

from .tiny import make_model


def save_adapter(folder, family="llama", r=8, planted=None, seed=0, scale_by=None, decay=None, **config):
    """Save a PEFT adapter of `family` whose ΔW per weight has rank `planted` (None: full rank r).

    `scale_by` maps a name fragment to a factor on B (to make some modules barely move); `decay`
    makes B's columns orthogonal with norms decay**i (a spectrum falling geometrically).
    Returns the PeftModel (the oracle for ΔW)."""
    from peft import LoraConfig, get_peft_model

    config.setdefault("target_modules", "all-linear")
    model = make_model(family)
    peft_model = get_peft_model(model, LoraConfig(r=r, **config))
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            k = p.shape[1] if planted is None else planted
            rows = p.shape[0]
            value = torch.randn(rows, k, generator=gen) @ torch.randn(k, p.shape[1], generator=gen) * 0.05
            if decay is not None:
                basis = torch.linalg.qr(torch.randn(rows, p.shape[1], generator=gen))[0]
                value = basis * (0.3 * decay ** torch.arange(p.shape[1]))
            for fragment, factor in (scale_by or {}).items():
                if fragment in name:
                    value = value * factor
            p.data = value.to(p.dtype)
        elif "lora_magnitude_vector" in name:
            p.data = p.data * 1.1
    peft_model.save_pretrained(str(folder))
    return peft_model


def peft_deltas(peft_model) -> dict:
    """{PEFT key: ΔW per expert (E, out, in) or (1, …)} from PEFT's own get_delta_weight."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.r:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if getattr(module, "parameter_name", None):
            key = f"{key}.{module.parameter_name}"
        delta = module.get_delta_weight("default").detach().double()
        out[key] = delta if delta.ndim == 3 else delta.unsqueeze(0)
    return out


def reloaded_eval_loss(model: str, adapter_dir, eval_examples, pad_id: int, batch_size: int = 4):
    """(the PEFT model, its token-weighted eval loss): the adapter in ADAPTER_DIR loaded with
    `PeftModel.from_pretrained` on the fp32 base, evaluated on the sweep's eval batches."""
    import torch
    from peft import PeftModel

    from loraplan.autograd.lm_loss import causal_lm_loss_sum
    from loraplan.data.batches import eval_batches
    from loraplan.model.loading import load_model
    from loraplan.sweeps.ranking import weighted_mean_sem

    peft_model = PeftModel.from_pretrained(load_model(model, dtype="fp32", device="cpu"), str(adapter_dir)).eval()
    losses, counts = [], []
    with torch.no_grad():
        for mb in eval_batches(eval_examples, batch_size):
            ids, labels, mask = mb.tensors("cpu", pad_id)
            logits = peft_model(input_ids=ids, attention_mask=mask).logits
            losses.append(float(causal_lm_loss_sum(logits, labels)) / mb.supervised)
            counts.append(mb.supervised)
    return peft_model, weighted_mean_sem(losses, counts)[0]
