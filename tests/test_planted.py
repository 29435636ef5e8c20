"""Planted tasks (a base, a teacher = base + a planted low-rank update, data from the teacher) and
the demo that runs the journey on one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loraplan.cli import main
from loraplan.errors import UsageError
from loraplan.model.loading import load_structure, load_tokenizer
from loraplan.model.targets import resolve_targets
from loraplan.sweeps.demo import run_demo
from loraplan.sweeps.planted import PlantedSpec, PlantedTask, make_planted_task

SMALL = dict(layers=2, hidden=64, intermediate=128, vocab=64, examples=64, eval_examples=16, seq_len=12)


@pytest.mark.slow
def test_planted_task_files_and_answer(tmp_path):
    task = make_planted_task(tmp_path / "t", PlantedSpec(targets="q,v", rank=2, **SMALL))
    assert {p.name for p in task.folder.iterdir()} == {"base", "train.jsonl", "eval.jsonl", "planted.json",
                                                       "planted.safetensors"}
    assert task.roles == ["q", "v"] and task.target_modules == ["q_proj", "v_proj"]
    assert len(task.modules) == 4
    assert task.ideal_eval_loss < task.base_eval_loss  # the teacher predicts its own data better
    again = PlantedTask.load(task.folder)
    assert again.modules == task.modules and again.ideal_eval_loss == task.ideal_eval_loss
    # the planted factors have rank exactly 2, with equal singular values
    factors = load_file(str(task.folder / "planted.safetensors"))
    delta = factors["model.layers.0.self_attn.q_proj.B"] @ factors["model.layers.0.self_attn.q_proj.A"]
    s = torch.linalg.svdvals(delta)
    assert (s[2:] < 1e-4 * s[0]).all() and float(s[1]) == pytest.approx(float(s[0]), rel=1e-4)
    # one pseudo-word per token, BOS added, no EOS: the text is the teacher's sequence exactly
    tokenizer = load_tokenizer(str(task.base))
    row = json.loads((task.folder / "train.jsonl").read_text().splitlines()[0])["text"]
    ids = tokenizer(row).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == SMALL["seq_len"] + 1
    assert tokenizer.eos_token_id is None
    structure = load_structure(str(task.base))
    assert [m.name for m in resolve_targets(structure, "q,v").modules] == task.modules


def test_planted_bad_input(tmp_path, capsys):
    with pytest.raises(UsageError, match="exceeds"):
        make_planted_task(tmp_path / "a", PlantedSpec(rank=100, **SMALL))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        make_planted_task(tmp_path / "b", PlantedSpec(**SMALL))
    code = main(["planted", "--out", str(tmp_path / "c"), "--targets", "experts"])
    assert code == 2 and "has no experts" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_ranks_the_planted_configs_on_top(tmp_path):
    """The README's main command: on the default planted task (rank 4 in the MLP), every config that
    covers the MLP at r >= 4 ranks above every config that does not, and the recommended one is the
    planted config, mlp at r = 4 (each config at its own best learning rate)."""
    result = run_demo(tmp_path / "demo", progress=False, echo=lambda *a: None)
    assert result.recovered, result.sweep.summary
    rec = next(r for r in result.sweep.results if r.name == result.recommended)
    assert (rec.config, rec.targets, rec.r) == ("mlp_r4", "mlp", 4), result.sweep.summary  # the planted config
    planted = set(result.task.modules)
    structure = load_structure(str(result.task.base))
    ranking = result.sweep.summary.ranking
    by_name = {r.name: r for r in result.sweep.results}

    def covers(name):
        r = by_name[name]
        return planted <= {m.name for m in resolve_targets(structure, r.targets).modules} and r.r >= 4

    good = [n for n in ranking if covers(n)]
    bad = [n for n in ranking if not covers(n)]
    assert good and bad and ranking == good + bad, ranking
    assert (tmp_path / "demo" / "sweep" / "report.html").exists()
