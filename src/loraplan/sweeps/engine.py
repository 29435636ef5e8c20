"""The PEFT engine: trains a group of LoRA trials on one frozen base model, loaded once.

Each trial is a named adapter on the same PeftModel (PEFT holds several adapters at once; only the
active one trains), created under the same seed, so configs with equal shapes start equal. PEFT
lets adapters share a model only when their `target_parameters` (MoE experts, routers) are the same
set: a trial that needs another set parks the others (weights, optimizer and schedule kept, their
adapters removed) and each comes back when it next trains or is saved. The
runner drives the engine through `start` / `advance` / `finish` and decides the schedule (one after
another, or successive halving); the engine knows nothing about files — it reports through each
trial's `TrialWriter` (sweeps/folder.py). A faster engine can replace this one behind the same four
calls.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field

from ..data.batches import MicroBatch
from ..errors import UsageError
from ..plan.lora_plan import LoraPlan
from .folder import (
    EvalBatches,
    EvalPoint,
    TrainPoint,
    TrialPlan,
    TrialResult,
    TrialStatus,
    TrialWriter,
    now,
)
from .ranking import weighted_mean_sem
from .spec import TrainingSettings, Trial

# A loss above this multiple of its starting value is a blow-up (the run has diverged), even when
# finite: short ablation runs never recover from that, and transformers' Trainer would hide a NaN.
BLOWUP_FACTOR = 3.0


@dataclass
class TrialState:
    trial: Trial
    writer: TrialWriter
    peft_config: dict
    optimizer: object = None
    scheduler: object = None
    params: list = field(default_factory=list)
    step: int = 0
    status: TrialStatus | None = None  # None while it can still train
    message: str | None = None
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    started: float = field(default_factory=time.time)
    started_at: str = field(default_factory=now)
    last_eval: EvalPoint | None = None
    last_eval_batches: EvalBatches | None = None
    peak_memory: int | None = None
    rng: object = None
    parked: dict | None = None  # while its adapter is off the model: weights, optimizer and schedule state
    certificates: dict[str, list[float]] | None = None  # rank -> per-batch eval losses of the cut adapter

    @property
    def name(self) -> str:
        return self.trial.name

    @property
    def adapter(self) -> str:
        """The name PEFT knows this trial's adapter by."""
        return self.trial.adapter_name


def _fault(name: str, step: int) -> str | None:
    """Fault injection for the resilience tests: LORAPLAN_FAULT="trial:nan@3,other:oom@2" makes that
    trial's loss NaN at step 3 / raises an out-of-memory error at step 2; "trial:hang@2" stalls it
    there (so that a test can SIGKILL the process mid-trial); "trial:pause@2" stalls it 2 seconds, on
every attempt (so that a test can kill its worker, and the trial runs again)."""
    for item in filter(None, os.environ.get("LORAPLAN_FAULT", "").split(",")):
        trial, _, rest = item.partition(":")
        kind, _, at = rest.partition("@")
        if trial == name and int(at or 1) == step:
            return kind
    return None


def inject_fault(name: str, step: int) -> str | None:
    """Act on LORAPLAN_FAULT before a step (stall, or raise an out-of-memory error);
    the fault left for the step itself (nan) is returned."""
    import torch

    fault = _fault(name, step)
    if fault in ("hang", "pause"):
        time.sleep(600 if fault == "hang" else 2)
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory (injected by LORAPLAN_FAULT)")
    return fault


class PeftEngine:
    name = "peft"

    def __init__(self, model: str, settings: TrainingSettings, *, trust_remote_code: bool = False,
                 random_init: bool = False):
        self.model_source = model
        self.settings = settings
        self.trust_remote_code = trust_remote_code
        self.random_init = random_init
        self.base = None
        self.peft_model = None
        self.structure = None
        self.device = None
        self.pad_id = 0
        self.pad_multiple = 1
        self.live: dict[str, TrialState] = {}  # started and not finished, attached or parked
        self.notes: list[str] = []  # what the output should say about how trials ran (fallbacks)

    # -- set-up -----------------------------------------------------------------------------------

    def load(self, pad_id: int) -> None:
        import torch

        from ..model.loading import load_model, load_structure, torch_dtype

        self.pad_id = pad_id
        self.structure = load_structure(self.model_source, trust_remote_code=self.trust_remote_code)
        self.dtype = torch_dtype(self.settings.dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # cuDNN builds an attention plan per shape: 64-token buckets keep the shapes few (profile in
        # benchmarks/sweep/RESULTS.md); on CPU padding would only cost time
        self.pad_multiple = 64 if self.device.type == "cuda" else 1
        if self.settings.quantization and self.device.type != "cuda":
            raise UsageError(f"{self.settings.quantization} quantization needs a CUDA GPU")
        if self.random_init:
            torch.manual_seed(self.settings.seed)  # the same random base in every worker of a sweep
        self.base = load_model(self.model_source, dtype=self.settings.dtype, device=str(self.device),
                               trust_remote_code=self.trust_remote_code,
                               quantization=self.settings.quantization, random_init=self.random_init)
        self.base.requires_grad_(False)
        if self.settings.quantization:
            from peft import prepare_model_for_kbit_training

            self.base = prepare_model_for_kbit_training(self.base, use_gradient_checkpointing=self.settings.grad_ckpt)
        elif self.settings.grad_ckpt:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.base.enable_input_require_grads()
        if hasattr(self.base.config, "use_cache"):
            self.base.config.use_cache = False

    @property
    def dtype_name(self) -> str:
        return {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[str(self.dtype)]

    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"

    # -- the four calls -----------------------------------------------------------------------------

    def start(self, trial: Trial, writer: TrialWriter, training: dict) -> TrialState:
        """Attach a fresh adapter for the trial (seeded), its optimizer and schedule."""
        import torch

        plan: LoraPlan = trial.plan
        kwargs = plan.to_peft_kwargs(self.structure)
        writer.start(TrialPlan(trial.name, plan.to_dict(), kwargs, {**training, "learning_rate": self._lr(trial)}))
        state = TrialState(trial=trial, writer=writer, peft_config=kwargs)
        seed = self.settings.seed
        torch.manual_seed(seed)
        try:
            self._attach(state)
        except (ValueError, TypeError, RuntimeError) as e:
            state.status, state.message = TrialStatus.FAILED, f"PEFT could not build the adapter: {e}"
            return state
        self.live[state.name] = state
        state.optimizer = self._optimizer(trial, state.params)
        state.scheduler = self._scheduler(state.optimizer)
        torch.manual_seed(seed + 1)  # dropout: the same stream for every trial
        state.rng = torch.get_rng_state()
        return state

    def advance(self, states: list[TrialState], steps: list[list[MicroBatch]], until: int,
                eval_set: list[MicroBatch], eval_every: int, progress=None) -> None:
        """Train each live trial of the group from its current step to `until`, evaluating every
        `eval_every` steps and at `until`. A trial that fails is marked, and the others go on."""
        for state in states:
            if state.status is None:
                self._advance_one(state, steps, until, eval_set, eval_every, progress)

    def finish(self, state: TrialState, status: TrialStatus | None = None,
               message: str | None = None) -> TrialResult:
        """Record the trial's result, save its adapter (when it trained), and detach it."""
        state.status = status or state.status or TrialStatus.COMPLETED
        state.message = message or state.message
        saved = False
        if state.status in (TrialStatus.COMPLETED, TrialStatus.PRUNED) and state.parked is not None:
            self._unpark(state)
        if state.status in (TrialStatus.COMPLETED, TrialStatus.PRUNED) and self.peft_model is not None:
            try:
                state.writer.save_adapter(self.peft_model, state.adapter)
                saved = True
            except OSError as e:
                state.status, state.message = TrialStatus.FAILED, f"could not save the adapter: {e}"
        result = state.writer.finish(self._result(state, saved))
        self._detach(state)
        return result

    def close(self) -> None:
        if self.peft_model is not None:
            self.base = self.peft_model.unload()
            self.peft_model = None
        self.live.clear()

    # -- internals ------------------------------------------------------------------------------------

    def _attach(self, state: TrialState) -> None:
        """Put the trial's adapter on the model (fresh, seeded by the caller) and make it the active one.
        PEFT nests its ParamWrappers per set of `target_parameters`, so a trial whose set differs from
        an attached adapter's parks every other trial and starts from the bare base."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(**state.peft_config)
        mine = set(config.target_parameters or ())
        if self.peft_model is not None and mine and any(
                set(other.target_parameters or ()) not in (set(), mine) for other in self.peft_model.peft_config.values()):
            for other in self.live.values():
                if other is not state and other.parked is None:
                    self._park(other)
            self.base = self.peft_model.unload()
            self.peft_model = None
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.base, config, adapter_name=state.adapter)
        else:
            self.peft_model.add_adapter(state.adapter, config)
        self.peft_model.set_adapter(state.adapter)
        state.params = [p for _, p in self.peft_model.named_parameters() if p.requires_grad]

    def _park(self, state: TrialState) -> None:
        """Keep the trial's weights, optimizer and schedule state off the model (its adapter goes with
        the next unload)."""
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(self.peft_model, adapter_name=state.adapter)
        state.parked = {"weights": {k: v.detach().clone() for k, v in weights.items()},
                        "optimizer": state.optimizer.state_dict() if state.optimizer is not None else None,
                        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
                        "shapes": [tuple(p.shape) for p in state.params]}
        state.optimizer = state.scheduler = None
        state.params = []

    def _unpark(self, state: TrialState) -> None:
        """Attach a parked trial again with the weights and optimizer state it had."""
        from peft import set_peft_model_state_dict

        parked, state.parked = state.parked, None
        self._attach(state)
        set_peft_model_state_dict(self.peft_model, parked["weights"], adapter_name=state.adapter)
        if [tuple(p.shape) for p in state.params] != parked["shapes"]:
            raise RuntimeError(f"trial {state.name}: its adapter came back with other parameters")
        state.optimizer = self._optimizer(state.trial, state.params)
        state.scheduler = self._scheduler(state.optimizer)
        if parked["optimizer"] is not None:
            state.optimizer.load_state_dict(parked["optimizer"])
            state.scheduler.load_state_dict(parked["scheduler"])

    def _lr(self, trial: Trial) -> float:
        """The trial's own learning rate (a per-config sweep tries several), else the sweep's."""
        return trial.learning_rate or self.settings.learning_rate

    def _optimizer(self, trial: Trial, params):
        import torch

        s, plan, lr = self.settings, trial.plan, self._lr(trial)
        fused = {"fused": True} if self.device.type == "cuda" and not s.quantization else {}
        if plan.loraplus_lr_ratio:
            from peft.optimizers import create_loraplus_optimizer

            return create_loraplus_optimizer(model=self.peft_model, optimizer_cls=torch.optim.AdamW, lr=lr,
                                             loraplus_lr_ratio=plan.loraplus_lr_ratio, weight_decay=s.weight_decay, **fused)
        return torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay, **fused)

    def _scheduler(self, optimizer):
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        s = self.settings
        warmup = min(s.warmup_steps, max(s.max_steps - 1, 0))
        if s.scheduler == "constant":
            return get_constant_schedule_with_warmup(optimizer, warmup)
        make = get_cosine_schedule_with_warmup if s.scheduler == "cosine" else get_linear_schedule_with_warmup
        return make(optimizer, warmup, s.max_steps)

    def _advance_one(self, state, steps, until, eval_set, eval_every, progress) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            if state.parked is not None:
                self._unpark(state)
            self.peft_model.set_adapter(state.adapter)
            torch.set_rng_state(state.rng)
            while state.step < until and state.status is None:
                self._train_step(state, steps[state.step])
                if progress is not None:
                    progress(state)
                if state.status is None and (state.step % eval_every == 0 or state.step == until):
                    state.last_eval, state.last_eval_batches = self.evaluate(state, eval_set)
        except torch.OutOfMemoryError as e:
            state.status, state.message = TrialStatus.OOM, f"out of memory at step {state.step + 1}: {str(e).splitlines()[0]}"
            self._release(state)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one broken trial must not stop the sweep
            state.status = TrialStatus.FAILED
            state.message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            state.writer.write_error(traceback.format_exc())
            self._release(state)
        finally:
            state.rng = torch.get_rng_state()
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated()
                state.peak_memory = max(state.peak_memory or 0, peak)

    def _train_step(self, state: TrialState, micro_batches: list[MicroBatch]) -> None:
        import torch

        model = self.peft_model
        model.train()
        t0 = time.perf_counter()
        supervised = sum(mb.supervised for mb in micro_batches)
        fault = inject_fault(state.name, state.step + 1)
        total = 0.0
        for mb in micro_batches:
            ids, labels, mask = mb.tensors(self.device, self.pad_id, self.pad_multiple)
            loss = model_loss(model, ids, labels, mask, max(supervised, 1))
            if fault == "nan":
                loss = loss * float("nan")
            loss.backward()
            total += loss.item()
            state.tokens += int(mask.sum())
        state.step += 1
        record_train_loss(state, total, state.optimizer.param_groups[0]["lr"])
        if state.status is not None:
            state.optimizer.zero_grad(set_to_none=True)
            return
        if self.settings.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(state.params, self.settings.max_grad_norm)
            if not torch.isfinite(norm):
                state.status, state.message = TrialStatus.DIVERGED, grad_norm_message(float(norm), state.step)
                state.optimizer.zero_grad(set_to_none=True)
                return
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.train_seconds += time.perf_counter() - t0

    def evaluate(self, state: TrialState, eval_set: list[MicroBatch]) -> tuple[EvalPoint, EvalBatches]:
        """Token-weighted eval loss, its standard error from the per-batch losses, and the per-batch
        values (so two trials can be compared batch by batch)."""
        t0 = time.time()
        losses, counts = self._eval_losses(eval_set)
        mean, sem = weighted_mean_sem(losses, counts)
        point = EvalPoint(state.step, mean, sem, len(losses), round(time.time() - state.started, 3),
                          round(time.time() - t0, 3))
        state.writer.log(point)
        return point, EvalBatches(losses, counts)

    def _eval_losses(self, eval_set: list[MicroBatch]) -> tuple[list[float], list[int]]:
        """Each eval batch's mean loss over its supervised tokens, and that count (batches without any
        are left out)."""
        import torch

        model = self.peft_model
        model.eval()
        losses, counts = [], []
        with torch.no_grad():
            for mb in eval_set:
                n = mb.supervised
                if n == 0:
                    continue
                ids, labels, mask = mb.tensors(self.device, self.pad_id, self.pad_multiple)
                losses.append(float(model_loss(model, ids, labels, mask, n)))
                counts.append(n)
        return losses, counts

    def evaluate_cut(self, state: TrialState, eval_set: list[MicroBatch], rank: int) -> list[float] | None:
        """The per-batch eval losses of the trial's adapter with each ΔW cut to its `rank` largest
        singular directions (fair.derived); the trained weights are restored after."""
        from .fair import derived

        if state.status is not None or state.trial.plan.use_dora:
            return None
        if state.parked is not None:
            self._unpark(state)
        self.peft_model.set_adapter(state.adapter)
        with derived(self.peft_model, state.adapter, rank=rank):
            losses, _ = self._eval_losses(eval_set)
        return losses

    def _release(self, state: TrialState) -> None:
        import torch

        if state.optimizer is not None:
            state.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _detach(self, state: TrialState) -> None:
        import torch

        state.optimizer = state.scheduler = None
        state.params = []
        state.parked = None
        self.live.pop(state.name, None)
        if self.peft_model is not None and state.adapter in self.peft_model.peft_config:
            others = [n for n in self.peft_model.peft_config if n != state.adapter]
            if others:
                self.peft_model.set_adapter(others[0])
                self.peft_model.delete_adapter(state.adapter)
            else:
                self.base = self.peft_model.unload()
                self.peft_model = None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _result(self, state: TrialState, saved: bool) -> TrialResult:
        p = state.trial.plan
        tail = state.losses[-max(1, len(state.losses) // 10):] if state.losses else []
        finite_tail = [x for x in tail if math.isfinite(x)]
        ev = state.last_eval
        return TrialResult(
            name=state.name, status=state.status, message=state.message,
            targets=p.targets, r=p.r, lora_alpha=p.alpha, use_rslora=p.use_rslora, use_dora=p.use_dora,
            loraplus_lr_ratio=p.loraplus_lr_ratio, lora_dropout=p.lora_dropout,
            trainable_params=sum(x.numel() for x in state.params) if state.params else None,
            eval_loss=ev.eval_loss if ev else None, eval_loss_sem=ev.eval_loss_sem if ev else None,
            eval_step=ev.step if ev else None,
            train_loss=sum(finite_tail) / len(finite_tail) if finite_tail else None,
            steps=state.step, wall_s=round(time.time() - state.started, 3), train_s=round(state.train_seconds, 3),
            tokens_per_s=round(state.tokens / state.train_seconds, 1) if state.train_seconds else None,
            peak_memory_bytes=state.peak_memory, adapter="adapter" if saved else None,
            eval_batches=state.last_eval_batches if ev else None, started=state.started_at,
            engine="peft", learning_rate=self._lr(state.trial), config=state.trial.config,
            certificates=state.certificates)


def record_train_loss(state: TrialState, total: float, lr: float) -> None:
    """Log step `state.step`'s train loss; mark the trial diverged when the loss is not finite or
    has blown up (above BLOWUP_FACTOR × the median of the first three steps)."""
    state.losses.append(total)
    state.writer.log(TrainPoint(state.step, total, lr, state.tokens, round(time.time() - state.started, 3)))
    if not math.isfinite(total):
        state.status, state.message = TrialStatus.DIVERGED, f"loss is {total} at step {state.step}"
        return
    start = sorted(state.losses[:3])[len(state.losses[:3]) // 2]
    if state.step > 3 and total > BLOWUP_FACTOR * start:
        state.status = TrialStatus.DIVERGED
        state.message = f"loss blew up to {total:.3g} at step {state.step} (started at {start:.3g})"


def grad_norm_message(norm: float, step: int) -> str:
    return f"gradient norm is {norm} at step {step}"


def model_loss(model, ids, labels, mask, num_items: int):
    """The model's own causal-LM loss (transformers shifts the labels and upcasts the logits to fp32),
    summed over supervised tokens and divided by `num_items`: the supervised tokens of the whole
    optimizer step, so micro-batches are weighted by their tokens, not averaged."""
    return model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss

