"""Write a planted task: a small base model, a teacher = base + a low-rank update of rank k on the
chosen modules, and train/eval data sampled from the teacher. The answer (modules, rank) and the best
achievable eval loss are in planted.json: use it to check a sweep or a probe.

examples:
  loraplan planted --out tasks/mlp_r4
  loraplan planted --out tasks/qv_r2 --targets q,v --rank 2 --examples 4000
  loraplan sweep tasks/mlp_r4/base --data tasks/mlp_r4/train.jsonl --eval tasks/mlp_r4/eval.jsonl --out runs/planted
"""

from __future__ import annotations

from .options import add_json, positive_float, positive_int
from .render import emit_json


def register(parser):
    parser.add_argument("--out", required=True, help="a new folder for the task")
    parser.add_argument("--targets", default="mlp", help="where to plant the update (target grammar; default mlp)")
    parser.add_argument("--rank", type=positive_int, default=4, help="rank of the planted update (default 4)")
    parser.add_argument("--strength", type=positive_float, default=1.0,
                        help="planted singular value, relative to the module's largest (default 1.0)")
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--intermediate", type=positive_int, default=256)
    parser.add_argument("--vocab", type=positive_int, default=256)
    parser.add_argument("--examples", type=positive_int, default=2000, help="training sequences")
    parser.add_argument("--eval-examples", type=positive_int, default=256)
    parser.add_argument("--seq-len", type=positive_int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    add_json(parser)


def run(args) -> int:
    from ..sweeps.planted import PlantedSpec, make_planted_task

    spec = PlantedSpec(targets=args.targets, rank=args.rank, strength=args.strength, layers=args.layers,
                       hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab,
                       examples=args.examples, eval_examples=args.eval_examples, seq_len=args.seq_len,
                       seed=args.seed)
    task = make_planted_task(args.out, spec)
    if args.json:
        emit_json({"folder": str(task.folder), **task.to_json()})
        return 0
    print(f"planted a rank-{spec.rank} update in {', '.join(task.roles)} "
          f"({len(task.modules)} weights; target_modules={task.target_modules}) of a {spec.layers}-layer, "
          f"{spec.hidden}-wide Llama")
    print(f"eval loss: base {task.base_eval_loss:.4f}, teacher (the best any adapter can reach) {task.ideal_eval_loss:.4f}")
    print(f"wrote {task.folder}/: base/, train.jsonl ({spec.examples}), eval.jsonl ({spec.eval_examples}), "
          "planted.json, planted.safetensors")
    return 0
