"""The probe on planted tasks: the K-FAC-whitened gradient finds a change planted in the MLP (where
the raw gradient points at attention), estimates its rank, and its plan feeds a sweep."""

import json
import math

import pytest
import torch

from loraplan.cli import main
from loraplan.probing.probe import probe
from loraplan.probing.whitening import DAMPING, _Whitener
from loraplan.sweeps.planted import PlantedSpec, make_planted_task


@pytest.fixture(scope="module")
def mlp_task(tmp_path_factory):
    return make_planted_task(tmp_path_factory.mktemp("p") / "mlp4", PlantedSpec(rank=4, examples=1200, eval_examples=16))


@pytest.mark.slow
def test_probe_ranks_the_planted_mlp_first_and_estimates_its_rank(mlp_task):
    result = probe(str(mlp_task.base), str(mlp_task.train), batches=16, batch_size=32, max_length=64)
    ranking = [r.role for r in result.roles]
    assert set(ranking[:3]) == {"gate", "up", "down"}, ranking
    ranks = {r.role: r.rank for r in result.roles}
    assert all(2 <= ranks[role] <= 8 for role in ("gate", "up", "down")), ranks  # planted 4, within 2x
    assert result.plan is not None and {"gate", "up", "down"} <= set(result.plan.targets.split(","))
    assert 2 <= result.plan.r <= 8 and result.plan.reasons
    assert result.tokens == 16 * 32 * 49


@pytest.mark.slow
def test_raw_gradient_would_have_pointed_at_attention(mlp_task):
    """The trap the probe avoids: ‖∂L/∂W‖/‖W‖ at the base ranks v/o above the planted MLP."""
    from loraplan.data.batches import training_steps
    from loraplan.data.load import load_data
    from loraplan.model.loading import load_model, load_tokenizer

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


@pytest.mark.slow
def test_no_planted_change_means_no_signal(tmp_path):
    task = make_planted_task(tmp_path / "none", PlantedSpec(strength=1e-6, examples=600, eval_examples=16))
    result = probe(str(task.base), str(task.train), batches=8, batch_size=32, max_length=64)
    assert result.snr < 0.5 and any("weak against its noise" in n for n in result.notes)


def test_whitener_gives_the_symmetric_inverse_square_roots_energy_and_cross_term():
    """W = L⁻¹ (Cholesky) and the symmetric (F + λ)^-1/2 differ by a rotation: the same ⟨M₁, M₂⟩."""
    torch.manual_seed(0)
    dim, n = 12, 40
    x = torch.randn(n, dim, dtype=torch.float64) * torch.linspace(0.1, 3, dim, dtype=torch.float64)
    factor = x.T @ x
    f = factor / n
    damped = f + DAMPING * f.diagonal().mean() * torch.eye(dim, dtype=torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(damped)
    symmetric = (vectors * eigenvalues.rsqrt()) @ vectors.T
    g1, g2 = torch.randn(5, dim), torch.randn(5, dim)
    expected = float(((g1.double() @ symmetric) * (g2.double() @ symmetric)).sum())
    for columns in (1, dim):  # a triangular solve, or the explicit inverse
        w = _Whitener(factor.float(), n, columns)
        assert (w.inverse is not None) == (columns == dim)
        wd = w.left(torch.eye(dim)).double()
        assert torch.allclose(wd @ damped @ wd.T, torch.eye(dim, dtype=torch.float64), atol=1e-4)  # W F Wᵀ = I
        assert abs(float((w.right(g1) * w.right(g2)).sum()) - expected) < 1e-4 * abs(expected)
        both = w.right(torch.stack([g1, g2]))  # a leading fold dimension
        assert torch.allclose(both[1], w.right(g2), atol=1e-5)
    diagonal = _Whitener(factor.diagonal().float(), n)  # the wide-factor form: per-channel scale
    d = f.diagonal()
    assert torch.allclose(diagonal.right(g1).double(), g1.double() / (d + DAMPING * d.mean()).sqrt(), rtol=1e-5)


@pytest.mark.slow
def test_probe_cli_and_sweep_from_probe(mlp_task, tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    out = tmp_path / "probe.json"
    code = main(["probe", str(mlp_task.base), "--data", str(mlp_task.train), "--batches", "4", "--batch-size", "16",
                 "--max-length", "64", "--out", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["plan"]["targets"] and json.loads(out.read_text())["roles"] == data["roles"]
    assert set(data["importance"]) == {r["role"] for r in data["roles"]}
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # set before CUDA starts
    code = main(["sweep", str(mlp_task.base), "--data", str(mlp_task.train), "--out", str(tmp_path / "s"),
                 "--from-probe", str(out), "--dry-run"])
    listing = capsys.readouterr().out
    r = data["plan"]["r"]
    assert code == 0 and f"all-linear_r{r}" in listing and f"all-linear_r{2 * r}" in listing
    # the probe cannot tell attention from the MLP, nor the rank: the grid keeps both sides
    assert f"attention_r{r}" in listing and f"mlp_r{r}" in listing and f"mlp_r{max(1, r // 4)}" in listing
    assert data["uncertain"] and any("attention" in b for b in data["blind_spots"])
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's own setting wins
    code = main(["probe", str(mlp_task.base), "--data", str(mlp_task.train), "--batches", "3"])
    assert code == 2 and "at least 4" in capsys.readouterr().err
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


def test_python_callers_get_expandable_segments_before_cuda_starts(monkeypatch):
    """probe() sets the allocator setting `loraplan probe` relies on, unless the user set one (either
    name) or CUDA already started in the process (too late: nothing is set, nothing is said)."""
    import os

    from loraplan.probing.probe import _expandable_segments

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "x")  # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    _expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    _expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    _expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def _loaded(task):
    """The task's base model (fp32, CPU), structure, probed modules, 4 batches of 16 and the pad id."""
    from loraplan.data.batches import training_steps
    from loraplan.data.load import load_data
    from loraplan.model.loading import load_model, load_structure, load_tokenizer
    from loraplan.probing.probe import _candidates

    model = load_model(str(task.base), dtype="fp32", device="cpu")
    tokenizer = load_tokenizer(str(task.base))
    structure = load_structure(str(task.base))
    batches = [s[0] for s in training_steps(load_data(str(task.train), tokenizer, max_length=64).train,
                                            4, 16, None, 0)]
    return model, structure, _candidates(structure, "all-linear"), batches, tokenizer.pad_token_id


@pytest.mark.slow
def test_layer_groups_checkpointing_and_shared_input_factors_leave_the_signal_unchanged(mlp_task):
    """One pass for all layers, one pass per layer (what a small memory budget forces), or layers
    recomputed in the backward pass (all or some): the same per-module signal; q/k/v (and gate/up) share
    one input factor, counted once per token."""
    from loraplan.probing.passes import _checkpointed
    from loraplan.probing.probe import probe_batches
    from loraplan.probing.statistics import _SharedInputs, _Stats

    model, structure, modules, batches, pad = _loaded(mlp_task)
    together = probe_batches(model, structure, modules, batches, pad, memory_budget=1 << 40)
    apart = probe_batches(model, structure, modules, batches, pad, memory_budget=1, max_memory=1 << 30)
    # checkpointed layers run their forward (and the hooks) twice: each statistic still counts once
    recomputed = probe_batches(model, structure, modules, batches, pad, checkpointing=True)
    with _checkpointed(model, 1):  # only the first layer recomputed (what a GPU short of memory gets)
        partly = probe_batches(model, structure, modules, batches, pad, checkpointing=False)
    assert any("4 passes" in n for n in apart.notes) and not any("passes" in n for n in together.notes)
    assert any("--max-memory caps GPU memory; on cpu it is not used" in n for n in apart.notes)
    assert not any("--max-memory" in n for n in together.notes)
    assert any("4 of 4 layers recompute" in n for n in recomputed.notes)
    for a, b, c, d in zip(together.modules, apart.modules, recomputed.modules, partly.modules, strict=True):
        assert a.name == b.name == c.name == d.name and a.naive > 0
        assert a.signal == pytest.approx(b.signal, rel=1e-4) == pytest.approx(c.signal, rel=1e-4)
        assert d.signal == pytest.approx(a.signal, rel=1e-4)
        assert a.rank == c.rank == d.rank
    assert not model.model.layers[0].training and not model.is_gradient_checkpointing

    attention = model.model.layers[0].self_attn
    inputs = _SharedInputs()
    stats = [_Stats(getattr(attention, f"{p}_proj"), False, inputs) for p in "qkv"]
    for st in stats:
        st.attach()
    x = torch.randn(2, 5, model.config.hidden_size)
    for _ in range(2):
        sum(getattr(attention, f"{p}_proj")(x).sum() for p in "qkv").backward()
        inputs.end_batch()
    for st in stats:
        st.detach()
    assert stats[0].input is stats[1].input is stats[2].input and stats[0].input.n == 2 * 10
    assert torch.allclose(stats[0].input.dense().float(), 2 * x.reshape(10, -1).T @ x.reshape(10, -1), atol=1e-4)


@pytest.mark.slow
def test_running_out_of_memory_probes_again_leaner_and_keeps_finished_passes(mlp_task, monkeypatch):
    """An out-of-memory error mid-probe (a fragmented allocator cache, activations underestimated)
    costs a retry planning for less memory, not the run: finished passes are kept, the result is the
    same, a note says so. Out of memory on the last try (every layer recomputed): one clear error."""
    from loraplan.errors import UsageError
    from loraplan.probing import probe as probing

    model, structure, modules, batches, pad = _loaded(mlp_task)
    clean = probing.probe_batches(model, structure, modules, batches, pad, memory_budget=1)
    real, calls = probing._probe_layers, []

    def failing(net, by_name, group, *args, **kwargs):
        calls.append([m.layer for m in group])
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.76 GiB (made up)")
        return real(net, by_name, group, *args, **kwargs)

    monkeypatch.setattr(probing, "_probe_layers", failing)
    again = probing.probe_batches(model, structure, modules, batches, pad, memory_budget=1)
    assert calls == [[0] * 7, [1] * 7, [1] * 7, [2] * 7, [3] * 7]  # layer 0's pass is not run twice
    assert any(n.startswith("ran out of memory planning for 90% of the free GPU memory (CUDA out of memory. Tried")
               and n.endswith("probed again planning for 75%") for n in again.notes)
    for a, b in zip(clean.modules, again.modules, strict=True):
        assert a.name == b.name and a.signal == pytest.approx(b.signal, rel=1e-4) and a.rank == b.rank
    assert not model.is_gradient_checkpointing and all(not p.requires_grad and p.grad is None
                                                        for p in model.parameters())

    tries = []

    def always(net, by_name, group, *args, **kwargs):
        tries.append(net.is_gradient_checkpointing)
        raise torch.OutOfMemoryError("CUDA out of memory (made up)")

    monkeypatch.setattr(probing, "_probe_layers", always)
    with pytest.raises(UsageError, match="out of GPU memory while probing, even with every layer recomputed in the "
                                         "backward pass and 60% of the free memory planned for"):
        probing.probe_batches(model, structure, modules, batches, pad)
    assert tries == [False, False, True]  # the last try recomputes every layer


@pytest.mark.parametrize("half", [False, True])
def test_warm_up_runs_the_whitening_and_spectra(monkeypatch, half):
    """The first-call warm-up goes through the real whitening and spectra (both whitening paths, Ritz
    spectra), so a change there cannot leave it silently doing nothing."""
    from loraplan.probing import passes as probing

    seen = []
    real = probing._finish
    monkeypatch.setattr(probing, "_finish", lambda pending: seen.append(real(pending)))
    probing._WarmUp(torch.device("cpu"), half).join()
    (signals,) = seen
    (signal,) = signals.values()
    assert signal.name == "warm-up" and signal.naive > 0 and math.isfinite(signal.signal)  # folds of pure noise


@pytest.mark.slow
def test_solved_and_inverted_whitening_agree_on_a_wide_mlp(monkeypatch, tmp_path):
    """A factor whitening fewer than a third of its width in vectors is applied by triangular solves
    (here the MLP's 256-wide side against a 32-wide model: gate/up's outputs, down's input), whose
    column-major results once broke the probe; the signals equal those of inverses everywhere."""
    import transformers

    from loraplan.data.batches import MicroBatch
    from loraplan.model.loading import load_structure
    from loraplan.probing import probe as probing
    from loraplan.probing import whitening

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    net = transformers.AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path)
    structure = load_structure(str(tmp_path))
    modules = probing._candidates(structure, "all-linear")
    rows = torch.randint(0, 128, (16, 4, 24)).tolist()
    batches = [MicroBatch(b, b) for b in rows]
    solved = probing.probe_batches(net, structure, modules, batches, pad_id=0)
    built, paths = whitening._Whitener.__init__, []

    def inverted(self, factor, n, columns=0, boost=1.0, half=False):
        paths.append(3 * columns < factor.width)
        built(self, factor, n, 1 << 30, boost, half)

    monkeypatch.setattr(whitening._Whitener, "__init__", inverted)
    everywhere = probing.probe_batches(net, structure, modules, batches, pad_id=0)
    assert sum(paths) == 3  # gate's and up's outputs, down's input
    for a, b in zip(solved.modules, everywhere.modules, strict=True):
        assert a.signal == pytest.approx(b.signal, rel=1e-4, abs=1e-6 * abs(b.naive)) and a.rank == b.rank


def test_padding_is_left_out_of_the_factors():
    """A right-padded batch adds only its real tokens' rows to the input and output factors."""
    from loraplan.data.batches import MicroBatch
    from loraplan.probing.statistics import _SharedInputs, _Stats

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    inputs = _SharedInputs()
    st = _Stats(layer, False, inputs)
    st.attach()
    mb = MicroBatch([[1, 2, 3, 4, 5], [1, 2]], [[1, 2, 3, 4, 5], [1, 2]])
    x = torch.randn(2, 5, 6)
    inputs.start_batch(mb, 5, "cpu")
    layer(x).pow(2).sum().backward()
    inputs.end_batch()
    st.detach()
    real = torch.cat([x[0], x[1, :2]])
    assert st.input.n == st.output.n == 7
    assert torch.allclose(st.input.dense().float(), real.T @ real, atol=1e-5)


@pytest.mark.parametrize("n", [1, 13, 64, 100])
def test_triangular_inverse_by_blocks(n):
    """Every split: one block, blocks of 1, widths that need padding (13 = 4 × 4 - 3), powers of two;
    also a column-major L (what cholesky returns on some devices), and merges in fp32."""
    from loraplan.probing.whitening import _lower_inverse

    torch.manual_seed(0)
    lower = torch.randn(n, n, dtype=torch.float64).tril() + 4 * torch.eye(n, dtype=torch.float64)
    for block in (1, 2, 4, 5, 16, n, 2 * n):
        for layout in (lower, lower.T.contiguous().T):
            exact = _lower_inverse(layout, block)
            assert torch.allclose(exact @ lower, torch.eye(n, dtype=torch.float64), atol=1e-12)
            single = _lower_inverse(layout, block, merge=torch.float32)  # the GPU's TF32 merges, here in fp32
            assert single.dtype == torch.float32
            assert (single.double() - exact).abs().max() < 1e-6 * exact.abs().max()


def test_memory_plan_checkpoints_as_few_layers_as_fit():
    from loraplan.probing.memory_plan import _choose

    gib = 1 << 30
    # 60 GiB usable, 40 GiB of statistics, 3 GiB of whitening temporaries (after the passes);
    # activations 28 GiB with no layer checkpointed, 4 with all 32 (0.75 GiB a layer)
    assert _choose(60 * gib, 40 * gib, 3 * gib, 28 * gib, 4 * gib, 32, None) == (int(28 * gib - 11 * 0.75 * gib), 11)
    assert _choose(60 * gib, 20 * gib, 3 * gib, 28 * gib, 4 * gib, 32, None) == (28 * gib, 0)  # everything fits: none
    assert _choose(60 * gib, 58 * gib, 1 * gib, 28 * gib, 4 * gib, 32, None) == (4 * gib, 32)  # layer groups: all
    assert _choose(60 * gib, 54 * gib, 7 * gib, 28 * gib, 4 * gib, 32, None) == (4 * gib, 32)  # the whitening does not fit
    assert _choose(60 * gib, 40 * gib, 3 * gib, 28 * gib, 4 * gib, 32, True) == (4 * gib, 32)
    assert _choose(60 * gib, 40 * gib, 3 * gib, 28 * gib, 4 * gib, 32, False) == (28 * gib, 0)
    assert _choose(60 * gib, 40 * gib, 3 * gib, 28 * gib, 0, 0, None) == (28 * gib, 0)  # no checkpointable layers


def test_passes_hold_the_activations_or_the_whitening_not_both():
    """A pass's statistics sit next to a batch's activations, then (activations freed) next to their
    whitening's temporaries: the usable memory must hold the larger of the two, not their sum."""
    from types import SimpleNamespace

    from loraplan.probing.memory_plan import _layer_bytes, _passes, _whitening_bytes

    modules = [SimpleNamespace(name=f"l{i}.{r}", role=r, layer=i, in_features=64, out_features=64)
               for i in range(4) for r in ("q", "o")]
    layer, whitening = _layer_bytes(modules[:2], 2), _whitening_bytes(modules)
    assert whitening > layer
    usable = 4 * layer + whitening
    assert _passes(modules, usable, whitening, 2) == [modules]  # the sum would have split them
    assert len(_passes(modules, usable, whitening + 1, 2)) == 2
    assert len(_passes(modules, usable - 2 * layer, 0, 2)) == 2  # the whitening alone still counts


def test_half_precision_cross_gram_adds_noise_not_bias():
    """Folds summed in bf16 get their cross product from bf16 roundings of the whitened folds: each
    fold's rounding is independent of the other's, so ⟨M₁, M₂⟩ = tr C moves by a small fraction of
    the estimator's own noise, and the spectrum's 90% rank and noise floor stay put."""
    from loraplan.probing.spectra import _cross, _ranks

    torch.manual_seed(0)
    rows, cols, planted = 700, 300, 12
    u, v = torch.linalg.qr(torch.randn(rows, planted)).Q, torch.linalg.qr(torch.randn(cols, planted)).Q
    signal = u @ torch.diag(1 / (1 + torch.arange(planted) / 4)) @ v.T
    m = torch.stack([signal + 0.01 * torch.randn(rows, cols), signal + 0.01 * torch.randn(rows, cols)])
    exact, half = _cross(m[0].double(), m[1].double()), _cross(m[0].bfloat16(), m[1].bfloat16()).double()
    assert half.dtype == torch.float64 and torch.equal(half, half.T)
    noise = (m[0] * m[1]).double().square().sum().sqrt()  # the scale of tr C's sampling noise
    assert abs(half.trace() - exact.trace()) < 1e-3 * noise  # (fp8 roundings: 2e-2)
    spectra = torch.linalg.eigvalsh(torch.stack([exact, half])).flip(-1)
    (rank_exact, rank_half), _ = _ranks(spectra)
    assert rank_half == rank_exact
    assert spectra[1, -1] == pytest.approx(float(spectra[0, -1]), rel=0.02)  # the noise floor


def test_half_precision_whitening_moves_the_metric_not_the_noise():
    """bf16 folds are whitened by bf16 roundings of W on the tensor cores. W's rounding is shared by
    both folds: it moves the metric, so the signal moves by well under 0.2% (10% more damping moves it
    15%); the products' roundings are each fold's own, so pure noise stays unbiased."""
    from types import SimpleNamespace

    from loraplan.probing.spectra import _ranks, _signal

    torch.manual_seed(0)
    out, inp, n = 192, 256, 4000

    def factor(dim):  # activations with channel scales over three decades and a few outliers
        scales = torch.logspace(-2, 1, dim)
        scales[:3] *= 30
        x = torch.randn(n, dim) * scales
        return x.T @ x

    def symmetric(f, damping=DAMPING):  # (F + λ)^-1/2, float64
        f = f.double() / n
        f += damping * f.diagonal().mean() * torch.eye(f.shape[0], dtype=torch.float64)
        values, vectors = torch.linalg.eigh(f)
        return (vectors * values.rsqrt()) @ vectors.T

    a, s = factor(inp), factor(out)
    for strength in (1.0, 0.1, 0.0):
        update = strength * torch.randn(out, 6) @ torch.randn(6, inp)
        folds = [(update + torch.randn(out, inp)).bfloat16() for _ in range(2)]
        exact = {}
        for damping in (DAMPING, 1.1 * DAMPING):
            m1, m2 = (symmetric(s, damping) @ f.double() @ symmetric(a, damping) for f in folds)
            exact[damping] = float((m1 * m2).sum())
        noise = float((m1 - m2).square().sum()) / 2
        half = _signal(SimpleNamespace(name="x"), SimpleNamespace(folds=folds),
                       _Whitener(a, n, 2 * out, half=True), _Whitener(s, n, 2 * inp, half=True))
        full = _signal(SimpleNamespace(name="x"), SimpleNamespace(folds=[f.float() for f in folds]),
                       _Whitener(a, n, 2 * out), _Whitener(s, n, 2 * inp))
        assert half.cross.dtype == torch.float32 and half.cross.shape == (out, out)
        assert abs(float(half.signal) - exact[DAMPING]) < 2e-3 * abs(exact[DAMPING]) + 1e-4 * noise
        if strength:
            assert abs(exact[1.1 * DAMPING] / exact[DAMPING] - 1) > 0.1
        spectra = torch.linalg.eigvalsh(torch.stack([full.cross, half.cross]).double()).flip(-1)
        ranks, _ = _ranks(spectra)
        assert ranks[0] == ranks[1]


def test_wide_factors_keep_their_diagonal(monkeypatch):
    """Wider than DENSE_MAX: the factor is Σ x² per channel, summed in fp32 (also from bf16 inputs)."""
    import loraplan.probing.statistics as probing

    monkeypatch.setattr(probing, "DENSE_MAX", 8)
    x = torch.randn(3, 5, 12)
    moment = probing._Moment()
    moment.add(x.bfloat16(), 0)
    moment.add(x, 0)  # the same batch again (a recomputed forward): not counted twice
    moment.add(x, 1)
    expected = x.bfloat16().float().pow(2).sum((0, 1)) + x.pow(2).sum((0, 1))
    assert moment.n == 30 and moment.matrix.dtype == torch.float32 and moment.matrix.shape == (12,)
    assert torch.allclose(moment.dense().float(), expected, rtol=1e-5)


@pytest.mark.parametrize("planted, noise", [(40, 0.005), (40, 0.01), (40, 0.03), (3, 0.005)])
def test_wide_spectra_match_the_exact_cross_gram(planted, noise):
    """600 columns (> EXACT_MAX): the Ritz values of the 256-column subspace give the exact 90% rank within
    one and the noise floor (the most negative eigenvalue) within 5%, also when C has far fewer
    directions than the space has columns. A plain Gaussian compression ΩᵀCΩ (64 columns) reads the
    40-direction case as about 60% of its rank."""
    from loraplan.probing.spectra import (
        EXACT_MAX,
        _cross,
        _Eigenvalues,
        _ranks,
        _spectrum_matrices,
    )

    torch.manual_seed(0)
    rows, cols = 900, 600
    assert cols > EXACT_MAX
    u, v = torch.linalg.qr(torch.randn(rows, planted)).Q, torch.linalg.qr(torch.randn(cols, planted)).Q
    signal = u @ torch.diag(1 / (1 + torch.arange(planted) / 20)) @ v.T
    m1, m2 = signal + noise * torch.randn(rows, cols), signal + noise * torch.randn(rows, cols)

    def rank(cross):
        return _ranks(torch.linalg.eigvalsh(cross).flip(0)[None])[0][0]

    def floor(cross):
        return -float(torch.linalg.eigvalsh(cross)[0])

    full = ((m1.T @ m2 + m2.T @ m1) / 2).double()
    crosses = [_cross(m1, m2), _cross(m1, m2)]
    ritz, again = torch.cat(list(_spectrum_matrices(crosses, {}))).double()  # two: each gets the same subspace
    assert not crosses and ritz.shape == (256, 256) and torch.equal(ritz, again)
    with _Eigenvalues() as eigenvalues:
        eigenvalues.add([0, 1], torch.stack([ritz, full[:256, :256]]))
        (index, values), = eigenvalues.results()
    assert index == [0, 1]
    assert torch.allclose(values[0], torch.linalg.eigvalsh(ritz).flip(0))
    exact = rank(full)
    assert abs(rank(ritz) - exact) <= 1
    assert floor(ritz) == pytest.approx(floor(full), rel=0.05)
    if planted == 40:
        omega = torch.randn(cols, 64) / 8
        assert rank(((omega.T @ m1.T @ m2 @ omega + omega.T @ m2.T @ m1 @ omega) / 2).double()) < 0.7 * exact


def test_ranks_take_the_noise_floor_off_each_spectrum():
    from loraplan.probing.spectra import ENERGY, _ranks

    assert ENERGY == 0.9
    values = torch.tensor([[3.0, 1.0, -0.5], [5.0, 1.0, -2.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    ranks, tops = _ranks(values)
    # floor 0.5: 2.5 and 0.5 above it, 83% in one direction; floor 2: only 3 above it; nothing above the floor
    assert ranks == [2, 1, 0]
    assert tops == [[2.5, 0.5], [3.0], []]


@pytest.mark.parametrize("width", [1, 2, 7, 64])
def test_factors_are_kept_in_half_their_space(width):
    """A dense factor is packed in n(n + 1)/2 entries (n/2 more for an odd n) and unpacks to Σ xxᵀ,
    symmetric, whatever the batches' dtypes; the memory plan counts the packed size."""
    import loraplan.probing.statistics as probing

    torch.manual_seed(0)
    moment, expected = probing._Moment(), torch.zeros(width, width, dtype=torch.float64)
    for batch, x in enumerate([torch.randn(9, width), torch.randn(2, 3, width).bfloat16()]):
        moment.add(x, batch)
        moment.add(x, batch)  # a recomputed forward: counted once
        rows = x.reshape(-1, width).double()
        expected += rows.T @ rows
    dense = moment.dense()
    assert moment.matrix.numel() == width * (width + 1) // 2 + (width % 2) * (width + 1) // 2
    assert dense.dtype == torch.float64 and torch.equal(dense, dense.T) and moment.n == 15
    assert torch.allclose(dense, expected, rtol=1e-5, atol=1e-5)
    assert probing._factor_bytes(width) == 4 * moment.matrix.numel()
    assert probing._factor_bytes(width, packed=False) == 4 * width * width
