"""The per-version exactness table: every causal-LM architecture of the installed transformers,
built tiny on the meta device, `loraplan count` against PEFT's get_nb_trainable_parameters().

    python benchmarks/exactness/table.py            # all architectures, every spec
    python benchmarks/exactness/table.py mixtral    # some

Prints one markdown row for the installed transformers/PEFT and every comparison that does not
agree. The comparison itself is the test's (tests/support/every_arch.py: compare), so the table and
tests/test_every_architecture.py cannot drift apart.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from support import every_arch  # noqa: E402


def main(only: list[str]) -> None:
    start = time.time()
    kinds: dict[str, Counter] = {spec: Counter() for spec in every_arch.SPECS}
    built = unbuilt = 0
    for model_type in every_arch.architectures():
        if only and model_type not in only:
            continue
        if model_type in every_arch.UNBUILDABLE:
            unbuilt += 1
            print(f"skipped {model_type}: {every_arch.UNBUILDABLE[model_type]}", file=sys.stderr)
            continue
        built += 1
        for spec in every_arch.SPECS:
            outcome = every_arch.compare(model_type, spec)
            kinds[spec][outcome.kind] += 1
            if not outcome.agrees:
                print(f"{model_type} {spec}: {outcome.kind}: {outcome.detail}", file=sys.stderr)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("transformers", "peft"))
    linear = kinds["all-linear"]
    print("| version set | architectures built | `all-linear` equal to PEFT | both refuse | mismatches | crashes |")
    print("|---|---|---|---|---|---|")
    print(f"| {versions} | {built} (+{unbuilt} not buildable) | {linear['equal']} | {linear['both refuse']} | "
          f"{sum(v for k, v in linear.items() if k not in ('equal', 'both refuse', 'crash'))} | {linear['crash']} |")
    print()
    print("| spec | " + " | ".join(sorted({k for c in kinds.values() for k in c})) + " |")
    names = sorted({k for c in kinds.values() for k in c})
    print("|---" * (len(names) + 1) + "|")
    for spec, counter in kinds.items():
        print(f"| {spec} | " + " | ".join(str(counter[k]) for k in names) + " |")
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
