"""The planted tasks the fair sweep and the probe are judged on, split before any result was seen.

TUNING: the built-in generator's family (Llama, one pseudo-word or one character per token, k equal
planted singular values, the teacher sampling at temperature 1 from its own context, every layer).
Methods and constants may be chosen by looking at these.

HELD_OUT: generators never tuned on: other bases (Qwen3, Gemma), a BPE tokenizer (the text the sweep
re-tokenizes is not the teacher's token sequence), sampling temperatures ≠ 1, prompted contexts
(prompt from the base, completion from the teacher), Gaussian and decaying planted spectra, changes in
some layers only, other widths, depths, init ranges and strengths, and role sets that are not in the
tuning set (k alone, v,o, up alone, q+down). They are run once, with the method fixed, and every
case is reported, failures included.

Written 2026-12-04 before the first experiment; not changed after (git log shows it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    targets: str
    rank: int
    spec: dict = field(default_factory=dict)  # PlantedSpec overrides

    def planted_spec(self):
        from loraplan.sweeps.planted import PlantedSpec

        return PlantedSpec(targets=self.targets, rank=self.rank, **{**TINY, **self.spec})


# every task: tiny enough to train dozens of adapters at once on a shared 2-core CPU
TINY = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, seq_len=32, examples=2000,
            eval_examples=256)

TUNING = [
    Case("t01_o_r4", "o", 4, dict(seed=101)),
    Case("t02_mlp_r4", "mlp", 4, dict(seed=102)),
    Case("t03_qv_r2", "q,v", 2, dict(seed=103)),
    Case("t04_down_r8", "down", 8, dict(seed=104)),
    Case("t05_attention_r1", "attention", 1, dict(seed=105)),
    Case("t06_v+up_r4", "v,up", 4, dict(seed=106)),
    Case("t07_up_r2_weak", "up", 2, dict(seed=107, strength=0.4)),
    Case("t08_qv_r8_char_weak", "q,v", 8, dict(seed=108, tokenizer="char", strength=0.4)),
    Case("t09_mlp_r16_char", "mlp", 16, dict(seed=109, tokenizer="char")),
    Case("t10_o_r2_wide", "o", 2, dict(seed=110, hidden=96, intermediate=192, layers=3)),
]

HELD_OUT = [
    Case("h01_qv_r4_qwen3_bpe_t0.8", "q,v", 4, dict(seed=201, architecture="qwen3", tokenizer="bpe", vocab=192,
                                                     temperature=0.8)),
    Case("h02_o_r4_gemma_prompted", "o", 4, dict(seed=202, architecture="gemma", context="prompted", prompt_len=12)),
    Case("h03_k_r2_bpe_gauss_h96", "k", 2, dict(seed=203, tokenizer="bpe", vocab=160, spectrum="gaussian", hidden=96,
                                                  intermediate=256)),
    Case("h04_vo_r8_qwen3_char_decay_t1.2", "v,o", 8, dict(seed=204, architecture="qwen3", tokenizer="char",
                                                            spectrum="decaying", temperature=1.2)),
    Case("h05_attention_r4_h128_prompted", "attention", 4, dict(seed=205, hidden=128, intermediate=256, layers=3,
                                                                 heads=8, kv_heads=4, init_range=0.25,
                                                                 context="prompted", prompt_len=8)),
    Case("h06_mlp_r1_gemma_bpe", "mlp", 1, dict(seed=206, architecture="gemma", tokenizer="bpe", vocab=200)),
    Case("h07_mlp_r16_gauss_s0.5", "mlp", 16, dict(seed=207, spectrum="gaussian", strength=0.5)),
    Case("h08_up_r4_qwen3_t0.8", "up", 4, dict(seed=208, architecture="qwen3", temperature=0.8, hidden=48,
                                               intermediate=160, heads=4, kv_heads=4)),
    Case("h09_down_r2_l4_char_layers", "down", 2, dict(seed=209, layers=4, tokenizer="char", planted_layers="1,2")),
    Case("h10_q+down_r4_gemma_gauss", "q,down", 4, dict(seed=210, architecture="gemma", spectrum="gaussian")),
    Case("h11_all_r8_qwen3_bpe_prompted_s0.5", "attention,mlp", 8, dict(seed=211, architecture="qwen3",
                                                                         tokenizer="bpe", vocab=256,
                                                                         context="prompted", prompt_len=10,
                                                                         strength=0.5)),
    Case("h12_vo_r1_t0.7_s2", "v,o", 1, dict(seed=212, temperature=0.7, strength=2.0)),
    Case("h13_qv_r16_h96_decay", "q,v", 16, dict(seed=213, hidden=96, intermediate=192, spectrum="decaying")),
    Case("h14_o_r8_qwen3_char_init0.1", "o", 8, dict(seed=214, architecture="qwen3", tokenizer="char",
                                                     init_range=0.1)),
]

CASES = {c.name: c for c in TUNING + HELD_OUT}


def make(case: Case, root: str):
    """The task folder for CASE under ROOT (made once, then reused)."""
    from pathlib import Path

    from loraplan.sweeps.planted import PlantedTask, make_planted_task

    folder = Path(root) / case.name
    if (folder / "planted.json").exists():
        return PlantedTask.load(folder)
    return make_planted_task(folder, case.planted_spec())
