"""The causal-LM loss without fp32 logits: transformers' loss and gradients, less memory held."""

import pytest
import torch
import transformers

import loraplan.autograd.lm_loss as lm_loss
from loraplan.autograd.lm_loss import causal_lm_loss, lean_causal_lm_loss


def _tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 11))
    labels = ids.clone()
    labels[0, 7:] = -100  # padding
    labels[1, :4] = -100  # a prompt
    return ids, labels


def _loss_and_grads(net, lean: bool, **kwargs):
    ids, labels = _batch()
    net.zero_grad()
    with lean_causal_lm_loss(net) if lean else torch.enable_grad():
        loss = net(input_ids=ids, labels=labels, use_cache=False, **kwargs).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("num_items", [None, 17])
def test_same_loss_and_gradients_as_transformers(num_items, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * 300 * 5)  # chunks of 5 rows: 33 rows in 7 chunks
    net = _tiny_llama()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected, expected_grads = _loss_and_grads(net, False, **kwargs)
    loss, grads = _loss_and_grads(net, True, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name


def test_bf16_gradients_match_within_rounding():
    net = _tiny_llama(torch.bfloat16)
    expected, expected_grads = _loss_and_grads(net, False)
    loss, grads = _loss_and_grads(net, True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    for name, grad in expected_grads.items():
        scale = grad.float().abs().max()
        assert (grads[name].float() - grad.float()).abs().max() <= 2e-2 * scale, name


def test_holds_no_fp32_logits_for_the_backward_pass():
    """What autograd keeps for the backward pass, in tensors of the logits' size: transformers' loss
    keeps an fp32 log-softmax; this one keeps the gradient, in the logits' dtype (bf16: a quarter)."""
    net = _tiny_llama(torch.bfloat16)
    ids, labels = _batch()
    rows = ids.numel()

    def saved_logit_bytes(lean: bool) -> int:
        sizes = []

        def pack(t):
            if t.numel() >= rows * 300:
                sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                (lean_causal_lm_loss(net) if lean else torch.enable_grad()):
            net(input_ids=ids, labels=labels, use_cache=False)
        return sum(sizes)

    assert saved_logit_bytes(False) >= rows * 300 * 4
    assert saved_logit_bytes(True) == rows * 300 * 2


def test_only_in_place_of_transformers_causal_lm_loss_and_restored():
    from transformers.loss.loss_utils import ForCausalLMLoss

    net = _tiny_llama()
    with lean_causal_lm_loss(net) as active:
        assert active and net.loss_function is causal_lm_loss
    assert net.loss_function is ForCausalLMLoss and "_loss_function" not in net.__dict__

    def own(*args, **kwargs):
        return ForCausalLMLoss(*args, **kwargs)

    net.loss_function = own  # a model with a loss of its own keeps it
    with lean_causal_lm_loss(net) as active:
        assert not active and net.loss_function is own
    assert net.loss_function is own

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    bert = transformers.BertForMaskedLM(config)
    with lean_causal_lm_loss(bert) as active:
        assert not active
    assert "_loss_function" not in bert.__dict__


def test_one_backward_pass_only():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = causal_lm_loss(logits[None], torch.tensor([[1, 2, 3, 4]]), 10)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass only"):
        loss.backward()
