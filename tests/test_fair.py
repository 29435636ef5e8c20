"""Fair comparisons (sweeps/fair.py): the decision rule and the adapters derived from a trained one."""

import pytest
import torch

from loraplan.sweeps.fair import Candidate, decide, derived, family_key, lr_grid
from loraplan.plan.lora_plan import LoraPlan


def cand(name, targets, r, params, losses, source=None):
    return Candidate(name, targets, r, params, sum(losses) / len(losses), list(losses), [10] * len(losses),
                     source=source)


def test_decide_picks_the_cheapest_within_paired_noise():
    best = cand("mlp_r32", "mlp", 32, 3200, [4.00, 4.10, 4.20, 4.30])
    close = cand("mlp_r32→r4", "mlp", 4, 400, [4.01, 4.09, 4.21, 4.31], source="mlp_r32")  # +0.0025, noisy
    worse = cand("mlp_r2", "mlp", 2, 200, [4.10, 4.20, 4.30, 4.40])  # +0.1 on every batch: no noise
    trained_same = cand("mlp_r4", "mlp", 4, 400, [4.02, 4.10, 4.20, 4.31])
    d = decide([best, close, worse, trained_same])
    assert d.best is best
    assert "mlp_r2" not in d.within
    assert d.pick is trained_same  # same params as the derived one: the trained one is preferred
    d = decide([best, close, worse])
    assert d.pick is close and d.pick.derived


def test_family_and_lr_grid():
    assert family_key(LoraPlan(targets="mlp", r=4, lora_alpha=16)) == family_key(LoraPlan(targets="mlp", r=32, lora_alpha=16))
    assert family_key(LoraPlan(targets="mlp", r=4)) != family_key(LoraPlan(targets="mlp", r=4, lora_alpha=16))
    assert family_key(LoraPlan(targets="mlp", r=4)) != family_key(LoraPlan(targets="mlp", r=4, use_dora=True))
    assert lr_grid(3e-3) == [1e-3, 3e-3, 9e-3]


def test_derived_adapter_is_the_svd_cut_and_is_restored():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    down = peft_model.base_model.model.model.layers[0].mlp.down_proj

    def delta(m):
        return m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight

    full = delta(q).detach().clone()
    before = [p.detach().clone() for p in peft_model.parameters() if p.requires_grad]
    with derived(peft_model, "default", rank=3, keep=lambda name: "q_proj" in name):
        u, s, vh = torch.linalg.svd(full)
        assert torch.allclose(delta(q), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
        assert torch.linalg.matrix_rank(delta(q)) == 3
        assert float(delta(down).detach().abs().max()) == 0.0
    after = [p.detach() for p in peft_model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(RuntimeError), derived(peft_model, "default", rank=2):
        raise RuntimeError("an eval that fails still restores the weights")
    assert torch.equal(delta(q), full)
