"""`loraplan demo`: the journey end to end, offline, on CPU, on a task whose answer is known.

1. a planted task: a small base model and data from a teacher = base + a rank-4 update in the MLP;
2. look: the base model's modules and roles (inspect) and what the rules of thumb would pick;
3. verify: the sweep, a grid of target sets × ranks, short runs, ranked by eval loss;
4. the check: does the recommended config name the planted modules at a rank within [k, 2k] of the
   planted k? The sweep compares each config at its own best learning rate (the default lr policy),
   so a higher rank cannot win by learning faster at a shared rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import check_output
from .planted import PlantedSpec, PlantedTask, make_planted_task

# The demo's trials: the tutorial default (q,v at r=8), all of attention, the MLP at ranks below, at
# and above the planted one, and everything. alpha = r (scale 1); each at its own best learning rate.
DEMO_TRIALS = [
    {"name": "qv_r8", "targets": "q,v", "r": 8},
    {"name": "attention_r8", "targets": "attention", "r": 8},
    {"name": "mlp_r2", "targets": "mlp", "r": 2},
    {"name": "mlp_r4", "targets": "mlp", "r": 4},
    {"name": "mlp_r8", "targets": "mlp", "r": 8},
    {"name": "all_r8", "targets": "attention,mlp", "r": 8},
]
DEMO_TRAINING = {"max_steps": 200, "batch_size": 16, "learning_rate": 1e-2, "warmup_steps": 10,
                 "eval_every": 50, "seed": 0}
DEMO_TASK = PlantedSpec(examples=4000)


@dataclass
class DemoResult:
    task: PlantedTask
    sweep: object  # SweepResult
    found_modules: bool
    found_rank: bool
    recommended: str | None
    recommended_r: int | None = None

    @property
    def recovered(self) -> bool:
        return self.found_modules and self.found_rank


def run_demo(out: str | Path = "loraplan-demo", *, planted: PlantedSpec | None = None,
             trials: list[dict] | None = None, training: dict | None = None, progress: bool = True,
             echo=print) -> DemoResult:
    from ..model.loading import load_structure
    from ..model.targets import resolve_targets
    from .runner import sweep

    out = check_output(out)
    task_dir = out / "task"
    spec = planted or DEMO_TASK
    if (task_dir / "planted.json").exists():
        task = PlantedTask.load(task_dir)
        echo(f"1/4 planted task: reusing {task_dir}")
    else:
        echo(f"1/4 planted task: a {spec.layers}-layer, {spec.hidden}-wide Llama; teacher = base + a rank-{spec.rank} "
             f"update in {spec.targets}; {spec.examples} training sequences sampled from the teacher")
        task = make_planted_task(task_dir, spec)
    echo(f"    eval loss of the base {task.base_eval_loss:.4f}; of the teacher {task.ideal_eval_loss:.4f} "
         "(the best any adapter can reach)")

    structure = load_structure(str(task.base))
    roles = [r for r in dict.fromkeys(m.role for m in structure.modules) if r not in ("other",)]
    echo(f"2/4 look: {structure.architecture}, {structure.total_params:,} parameters, roles {', '.join(roles)}")
    echo("    a tutorial would train q_proj,v_proj at r=8; the seeds' rules say: attention for behaviour, "
         "the MLP for knowledge — the sweep measures it")

    trials = trials or DEMO_TRIALS
    echo(f"3/4 sweep: {len(trials)} trials ({', '.join(t['name'] for t in trials)}), "
         f"{(training or DEMO_TRAINING)['max_steps']} steps each")
    result = sweep(str(task.base), str(task.train), eval=str(task.eval), out=out / "sweep",
                   overrides={"trials": trials, **{f"training.{k}": v for k, v in (training or DEMO_TRAINING).items()},
                              "data.max_length": task.spec.seq_len + 8},
                   progress=progress)
    recommended = result.summary.recommended
    found_modules = found_rank = False
    if recommended:
        rec = next(r for r in result.results if r.name == recommended)
        chosen = {m.name for m in resolve_targets(structure, rec.targets).modules}
        found_modules = set(task.modules) <= chosen
        found_rank = task.spec.rank <= rec.r <= 2 * task.spec.rank
    return DemoResult(task, result, found_modules, found_rank, recommended, rec.r if recommended else None)
