"""The alpha rule (plan/alpha.py), one table of cases, and each command that applies it: count's
rank table, the sweep spec, diagnose and recommend."""

from __future__ import annotations

import pytest

from loraplan.plan.alpha import DEFAULT_POLICY, alpha_for, alpha_traps, parse_policy, plan_traps
from loraplan.plan.count import rank_table
from loraplan.plan.lora_plan import LoraPlan
from loraplan.plan.recommend import recommend
from loraplan.sweeps.spec import Trial, alpha_warnings, expand, load_spec

# (case, plans, expected traps as (fixed, ranks) in order)
CASES = [
    ("fixed alpha across ranks", [LoraPlan(r=r, lora_alpha=16) for r in (8, 16, 64)], [(True, [8, 16, 64])]),
    ("fixed alpha with rsLoRA is rsLoRA's recipe",
     [LoraPlan(r=r, lora_alpha=16, use_rslora=True) for r in (8, 16, 64)], []),
    ("alpha = r (lora_alpha unset)", [LoraPlan(r=r) for r in (8, 16, 64)], []),
    ("alpha = r, written out", [LoraPlan(r=r, lora_alpha=r) for r in (8, 16)], []),
    ("alpha = 2r", [LoraPlan(r=r, lora_alpha=2 * r) for r in (8, 16, 32)], []),
    ("alpha = r with rsLoRA (the seeds' builder)", [LoraPlan(r=r, use_rslora=True) for r in (8, 32)], []),
    ("alpha not proportional to r", [LoraPlan(r=8, lora_alpha=16), LoraPlan(r=16, lora_alpha=48)],
     [(False, [8, 16])]),
    ("alpha = r at one rank is a fixed alpha at another", [LoraPlan(r=8), LoraPlan(r=16, lora_alpha=8)],
     [(True, [8, 16])]),
    ("one rank only", [LoraPlan(r=16, lora_alpha=32), LoraPlan(r=16, lora_alpha=32, use_dora=True)], []),
    ("DoRA is a series of its own",
     [LoraPlan(r=8, lora_alpha=16), LoraPlan(r=16, lora_alpha=16, use_dora=True)], []),
    ("a DoRA series with fixed alpha",
     [LoraPlan(r=r, lora_alpha=16, use_dora=d) for r in (4, 8) for d in (False, True)], [(True, [4, 8])]),
    ("other targets are another series", [LoraPlan(targets="q,v", r=8, lora_alpha=16),
                                          LoraPlan(targets="attention,mlp", r=16, lora_alpha=16)], []),
    ("rsLoRA trials left out, the rest still checked",
     [LoraPlan(r=8, lora_alpha=16), LoraPlan(r=16, lora_alpha=16), LoraPlan(r=32, lora_alpha=16, use_rslora=True)],
     [(True, [8, 16])]),
]


@pytest.mark.parametrize("case, plans, expected", CASES, ids=[c[0] for c in CASES])
def test_the_rule(case, plans, expected):
    traps = plan_traps(plans)
    assert [(t.fixed, t.ranks) for t in traps] == expected
    for trap in traps:
        text = trap.message()
        assert "Alpha/Rank Ratio Confusion" in text and "without rsLoRA" in text
        assert ("fixed at" in text) == trap.fixed and ("not proportional" in text) != trap.fixed


def test_series_with_the_same_pairs_are_one_warning_naming_each():
    plans = [LoraPlan(targets=t, r=r, lora_alpha=16, use_dora=d) for t in ("q,v", "attention") for r in (4, 8)
             for d in (False, True)]
    (trap,) = plan_traps(plans)
    assert trap.where == "targets q,v; targets q,v, DoRA; targets attention; targets attention, DoRA"
    assert "4 at r=4, 2 at r=8" in trap.message()


def test_groups_are_the_callers():
    assert alpha_traps([("a", 8, 16, False), ("b", 16, 16, False)]) == []
    (trap,) = alpha_traps([("a", 8, 16.0, False), ("a", 16, 16, False)])
    assert trap.group == "a" and trap.pairs == ((8, 16.0), (16, 16.0))


@pytest.mark.parametrize("policy, r, alpha", [("r", 16, None), ("1r", 16, None), ("2r", 16, 32.0),
                                              ("0.5r", 16, 8.0), (32, 16, 32.0), (" 2r ", 4, 8.0)])
def test_policies(policy, r, alpha):
    assert alpha_for(policy, r) == alpha


@pytest.mark.parametrize("policy", ["3x", "r2", "", "0r", 0, -1, True])
def test_bad_policies(policy):
    with pytest.raises(ValueError):
        parse_policy(policy)


def test_count_rank_table_carries_the_warning():
    from loraplan.model.loading import load_structure

    structure = load_structure("builtin:llama-3.2-1b")
    fixed = rank_table(structure, LoraPlan(targets="q,v", lora_alpha=16), [8, 16])
    assert all(any("fixed at 16 while r varies" in n for n in r.notes) for r in fixed)
    for plan in (LoraPlan(targets="q,v"), LoraPlan(targets="q,v", lora_alpha=16, use_rslora=True)):
        assert not any("Alpha/Rank" in n for r in rank_table(structure, plan, [8, 16]) for n in r.notes)


def test_sweep_spec_warns_through_the_rule():
    spec = load_spec(None, {"grid": {"targets": ["attention"], "r": [4, 8], "alpha": [16]}})
    (warning,) = alpha_warnings(expand(spec))
    assert "fixed at 16 while r varies" in warning and "alpha policy 'r'" in warning
    assert alpha_warnings(expand(load_spec(None, {}))) == []  # the seeds' grid: rsLoRA where r varies
    skewed = [Trial(name=n, plan=LoraPlan(targets="mlp", r=r, lora_alpha=a))
              for n, r, a in (("a", 8, 16), ("b", 16, 48))]
    assert "not proportional to r" in alpha_warnings(skewed)[0]


def test_recommend_follows_the_default_policy():
    for task, n in (("format_only", 500), ("domain_adaptation", 50_000)):
        plan = recommend(task, n)
        assert plan.lora_alpha == alpha_for(DEFAULT_POLICY, plan.r)
        assert plan_traps([plan.replace(r=r, lora_alpha=alpha_for(DEFAULT_POLICY, r)) for r in (4, 8, 64)]) == []
        reason = next(r.text for r in plan.reasons if r.choice == "lora_alpha")
        assert reason.startswith(f"alpha = {DEFAULT_POLICY} = {plan.alpha:g}")
