"""The probe on planted tasks: the K-FAC-whitened gradient finds a change planted in the MLP (where
the raw gradient points at attention), estimates its rank, and its plan feeds a sweep."""

import json

import pytest
import torch

from loraplan.cli import main
from loraplan.planted import PlantedSpec, make_planted_task
from loraplan.probing import _inverse_sqrt, probe


@pytest.fixture(scope="module")
def mlp_task(tmp_path_factory):
    return make_planted_task(tmp_path_factory.mktemp("p") / "mlp4", PlantedSpec(rank=4, examples=1200, eval_examples=16))


def test_probe_ranks_the_planted_mlp_first_and_estimates_its_rank(mlp_task):
    result = probe(str(mlp_task.base), str(mlp_task.train), batches=16, batch_size=32, max_length=64)
    ranking = [r.role for r in result.roles]
    assert set(ranking[:3]) == {"gate", "up", "down"}, ranking
    ranks = {r.role: r.rank for r in result.roles}
    assert all(2 <= ranks[role] <= 8 for role in ("gate", "up", "down")), ranks  # planted 4, within 2x
    assert result.plan is not None and {"gate", "up", "down"} <= set(result.plan.targets.split(","))
    assert 2 <= result.plan.r <= 8 and result.plan.reasons
    assert result.tokens == 16 * 32 * 49


def test_raw_gradient_would_have_pointed_at_attention(mlp_task):
    """The trap the probe avoids: ‖∂L/∂W‖/‖W‖ at the base ranks v/o above the planted MLP."""
    from loraplan.ablation.batches import training_steps
    from loraplan.data import load_data
    from loraplan.sources import load_model, load_tokenizer

    model = load_model(str(mlp_task.base), dtype="fp32", device="cpu")
    tokenizer = load_tokenizer(str(mlp_task.base))
    splits = load_data(str(mlp_task.train), tokenizer, max_length=64)
    model.requires_grad_(True)
    for step in training_steps(splits.train, 4, 32, None, 0):
        ids, labels, mask = step[0].tensors("cpu", tokenizer.pad_token_id)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    raw = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            raw.setdefault(name.split(".")[-1], []).append(float(module.weight.grad.norm() / module.weight.norm()))
    mean = {k: sum(v) / len(v) for k, v in raw.items()}
    assert max(mean["v_proj"], mean["o_proj"]) > max(mean["gate_proj"], mean["up_proj"], mean["down_proj"])


def test_no_planted_change_means_no_signal(tmp_path):
    task = make_planted_task(tmp_path / "none", PlantedSpec(strength=1e-6, examples=600, eval_examples=16))
    result = probe(str(task.base), str(task.train), batches=8, batch_size=32, max_length=64)
    assert result.snr < 0.5 and any("weak against its noise" in n for n in result.notes)


def test_inverse_sqrt_whitens_up_to_its_damping():
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    eigenvalues = torch.tensor([4.0, 3, 2.5, 2, 1.5, 1.2, 1.1, 1.0], dtype=torch.float64)
    cov = (q * eigenvalues) @ q.T
    w = _inverse_sqrt(cov).double()
    damping = 1e-2 * eigenvalues.mean()
    expected = (q * (eigenvalues / (eigenvalues + damping))) @ q.T  # (F + λ)^-1/2 F (F + λ)^-1/2
    assert torch.allclose(w @ cov @ w, expected, atol=1e-5)


def test_probe_cli_and_sweep_from_probe(mlp_task, tmp_path, capsys):
    out = tmp_path / "probe.json"
    code = main(["probe", str(mlp_task.base), "--data", str(mlp_task.train), "--batches", "4", "--batch-size", "16",
                 "--max-length", "64", "--out", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["plan"]["targets"] and json.loads(out.read_text())["roles"] == data["roles"]
    assert set(data["importance"]) == {r["role"] for r in data["roles"]}
    code = main(["sweep", str(mlp_task.base), "--data", str(mlp_task.train), "--out", str(tmp_path / "s"),
                 "--from-probe", str(out), "--dry-run"])
    listing = capsys.readouterr().out
    r = data["plan"]["r"]
    assert code == 0 and f"all-linear_r{r}" in listing and f"all-linear_r{2 * r}" in listing
    code = main(["probe", str(mlp_task.base), "--data", str(mlp_task.train), "--batches", "3"])
    assert code == 2 and "at least 4" in capsys.readouterr().err
