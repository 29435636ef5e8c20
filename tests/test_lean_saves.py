"""lean_saved_tensors: the backward pass keeps less, and the gradients are bitwise the same."""

import pytest
import torch
from support.tiny import FAMILIES, make_model

import loraplan.autograd.saved_tensors as lean_saves
from loraplan.autograd.saved_tensors import lean_saved_tensors


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(4, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _grads(net, lean: bool):
    ids, mask, labels = _inputs()
    net.zero_grad(set_to_none=True)
    with lean_saved_tensors(net) if lean else torch.enable_grad():
        loss = net(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitwise_the_same_gradients(family, dtype):
    """As the probe runs it (frozen model, the Linear weights requiring a gradient), on every family."""
    net = make_model(family).to(dtype).eval()
    net.requires_grad_(False)
    for module in net.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            module.weight.requires_grad_(True)
    loss, expected = _grads(net, lean=False)
    lean_loss, grads = _grads(net, lean=True)
    assert torch.equal(lean_loss, loss)
    assert expected and grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # all removed


def test_bitwise_the_same_when_every_weight_trains_and_layers_are_checkpointed():
    net = make_model("llama").to(torch.bfloat16).train()
    net.config.use_cache = False
    _, expected = _grads(net, lean=False)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, checkpointed = _grads(net, lean=True)
    net.gradient_checkpointing_disable()
    _, grads = _grads(net, lean=True)
    assert len(expected) == len(list(net.parameters()))
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), name
        assert torch.equal(checkpointed[name], grad), name


def _kept_bytes(net, lean: bool, monkeypatch) -> int:
    """Bytes of the distinct tensors the backward pass keeps (weights aside): those saved as they
    are, and those a recomputation is made from."""
    storages = {}

    def keep(saved):
        if isinstance(saved, lean_saves._View):
            return keep(saved.base)
        if isinstance(saved, lean_saves._Recompute):
            return [t for s in (saved.source if saved.fn is lean_saves._product else [saved.source])
                    for t in keep(s)]
        return [saved]

    hooks = torch.autograd.graph.saved_tensors_hooks

    class Counting(hooks):
        def __init__(self, pack, unpack):
            def counted(t):
                packed = pack(t)
                for kept in keep(packed):
                    if not isinstance(kept, torch.nn.Parameter):
                        storages[kept.untyped_storage().data_ptr()] = kept.untyped_storage().nbytes()
                return packed

            super().__init__(counted, unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", Counting)
    ids, mask, labels = _inputs()
    with lean_saved_tensors(net) if lean else Counting(lambda t: t, lambda t: t):
        net(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return sum(storages.values())


def test_keeps_less_by_exactly_what_is_recomputed(monkeypatch):
    """Per token and layer: SiLU's output and the gated product (intermediate size each), and each
    RMSNorm's fp32 upcast, replaced by its input (half the size). Layer 0's first norm reads the frozen
    embeddings (nothing saved for a gradient); the final norm counts instead."""
    net = make_model("llama").to(torch.bfloat16).eval()
    net.requires_grad_(False)
    for module in net.modules():
        if isinstance(module, torch.nn.Linear) and module is not net.lm_head:
            module.weight.requires_grad_(True)
    config = net.config
    tokens = _inputs()[0].numel()
    layers, width, hidden = config.num_hidden_layers, config.intermediate_size, config.hidden_size
    expected = tokens * (layers * 2 * width * 2 + 2 * layers * hidden * (4 - 2))
    saved = _kept_bytes(net, False, monkeypatch) - _kept_bytes(net, True, monkeypatch)
    assert saved == expected


class _Scaled(torch.nn.Module):
    """A product with a factor no gradient flows through, and one of two kept tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.act = torch.nn.GELU()

    def forward(self, x):
        scaled = self.a(x) * torch.linspace(0.5, 2.0, 6)
        return self.out(self.act(scaled) * self.b(x) + scaled)


def test_products_with_a_constant_factor_are_kept_and_gradients_match():
    torch.manual_seed(0)
    net, x = _Scaled(), torch.randn(5, 4)
    net(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    with lean_saved_tensors(net):
        net(x).square().sum().backward()
    for name, grad in expected.items():
        assert torch.equal(net.get_parameter(name).grad, grad), name


class _NormThenInPlace(torch.nn.Module):
    """The norm's input changed in place after the norm read it: its saved upcast no longer follows."""

    def __init__(self):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.lin, self.norm, self.out = torch.nn.Linear(4, 4), LlamaRMSNorm(4), torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        y = self.norm(h)
        h.mul_(3)
        return self.out(y) + h.sum()


def test_a_source_changed_in_place_is_an_error_not_a_wrong_gradient():
    net = _NormThenInPlace().to(torch.bfloat16)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    net(x).sum().backward()  # autograd alone: fine (the upcast is a copy)
    with lean_saved_tensors(net):
        loss = net(x).sum()
        with pytest.raises(RuntimeError, match="in-place"):
            loss.backward()


def test_hooks_are_removed_when_the_forward_pass_fails():
    net = make_model("llama")
    with pytest.raises(IndexError), lean_saved_tensors(net):
        net(input_ids=torch.tensor([[500]]))  # past the vocabulary
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    ids, mask, labels = _inputs()
    net(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # no hook left behind
