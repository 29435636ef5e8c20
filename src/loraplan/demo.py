"""`loraplan demo`: the journey end to end, offline, on CPU, on a task whose answer is known.

1. a planted task: a small base model and data from a teacher = base + a rank-4 update in the MLP;
2. look: the base model's modules and roles (inspect) and what the rules of thumb would pick;
3. verify: the sweep, a grid of target sets × ranks, short runs, ranked by eval loss;
4. the check: does the recommended config name the planted modules and a rank ≥ the planted one?
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .planted import PlantedSpec, PlantedTask, make_planted_task

# The demo grid: the tutorial default (q,v r8), attention, the MLP at ranks around the planted one,
# and everything. Alpha follows r (scale 1) so that ranks are compared fairly.
DEMO_GRID = {"targets": ["q,v", "attention", "mlp", "attention,mlp"], "r": [2, 4, 8], "alpha": ["r"]}
DEMO_TRAINING = {"max_steps": 200, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10,
                 "eval_every": 50, "seed": 0}


@dataclass
class DemoResult:
    task: PlantedTask
    sweep: object  # SweepResult
    found_modules: bool
    found_rank: bool
    recommended: str | None

    @property
    def recovered(self) -> bool:
        return self.found_modules and self.found_rank


def run_demo(out: str | Path = "loraplan-demo", *, planted: PlantedSpec | None = None, grid: dict | None = None,
             training: dict | None = None, progress: bool = True, echo=print) -> DemoResult:
    from .ablation.runner import sweep
    from .sources import load_structure
    from .targets import resolve_targets

    out = Path(out)
    task_dir = out / "task"
    spec = planted or PlantedSpec()
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

    grid = grid or DEMO_GRID
    echo(f"3/4 sweep: targets {' | '.join(grid['targets'])} × r {', '.join(map(str, grid['r']))} "
         f"({len(grid['targets']) * len(grid['r'])} trials)")
    result = sweep(str(task.base), str(task.train), eval=str(task.eval), out=out / "sweep",
                   overrides={"grid": grid, **{f"training.{k}": v for k, v in (training or DEMO_TRAINING).items()},
                              "data.max_length": spec.seq_len + 8},
                   progress=progress)
    recommended = result.summary.get("recommended")
    found_modules = found_rank = False
    if recommended:
        rec = next(r for r in result.results if r["name"] == recommended)
        chosen = {m.name for m in resolve_targets(structure, rec["targets"]).modules}
        found_modules = set(task.modules) <= chosen
        found_rank = rec["r"] >= task.spec.rank
    return DemoResult(task, result, found_modules, found_rank, recommended)
