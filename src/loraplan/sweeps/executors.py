"""Where a sweep's trials run: in this process, in one worker process per local GPU, or on Ray.

An executor gives the runner two calls, whatever the workers are: `advance(trials, until, final)`
trains each trial to step `until` (a barrier: it returns when every trial has got there, or failed),
and `stop(name, status, message)` ends a trial early (successive halving). The runner keeps the
schedule (one pass to max_steps, or rungs); the executor only places the work.

Every worker is a `TrialWorker`: one engine with the base loaded once, which starts a trial the first
time it sees it and keeps its state (adapter, optimizer, schedule) until the trial finishes, so a
trial that survives a rung goes on where it stopped, on the worker that holds it. A trial given to
a worker that does not hold it starts from step 0 (same seed, same batches: the same curve), which
is also how a trial whose worker died is run again. Workers write only their trial folders (through
the `TrialWriter` the driver gives them); the driver holds the folder's lock and writes the rest.

- `InProcess`: the engine in this process (a CPU-only machine, or one GPU by default).
- `LocalPool`: one `multiprocessing` worker per GPU (`--gpus 0,1`) or N CPU workers (`--gpus cpu:N`),
  spawned (CUDA does not survive fork), each seeing only its GPU; a worker exits when the driver dies.
- `RayPool`: one Ray actor per GPU slot (`num_gpus=gpus_per_trial`), placed by Ray's scheduler; each
  trial is a call on an actor (an actor task). Actors rather than one stateless task per trial: the
  base loads once per GPU, and a trial's optimizer state lives on between rungs. A dead actor is
  replaced by a new one.

A worker that dies (SIGKILL, a lost node, the host's OOM killer) takes its running trial with it:
that trial runs again once on a fresh worker, and is recorded `failed` (or `oom`) when it dies twice;
the other trials are not touched.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..data.batches import MicroBatch
from ..errors import UsageError
from .fast_engine import make_engine
from .folder import TrialResult, TrialStatus, TrialWriter
from .spec import ExecutorSettings, TrainingSettings, Trial

ATTEMPTS = 2  # runs of a trial whose worker keeps dying, before it is recorded as failed
RAY_INSTALL = "pip install 'loraplan[ray]'"


@dataclass
class Work:
    """What every worker needs to train any trial of the sweep; sent once per worker."""

    model: str
    settings: TrainingSettings
    training: dict  # the settings as plan.json records them
    pad_id: int
    steps: list[list[MicroBatch]]
    eval_set: list[MicroBatch]
    trust_remote_code: bool = False
    random_init: bool = False
    # a rank family's top-rank config (by config name) -> the lower ranks its ΔW is cut to when it
    # finishes (sweeps/fair.py certificate_ranks)
    cuts: dict[str, list[int]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=lambda: _passed_env())  # set in every worker


def _passed_env() -> dict[str, str]:
    """The driver's loraplan settings and offline switches, for workers on other nodes (Ray)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("LORAPLAN_") or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}


@dataclass
class Report:
    """A trial after a task: where it stands, and its result once it finished."""

    name: str
    step: int
    eval_loss: float | None
    result: TrialResult | None = None
    notes: list[str] = field(default_factory=list)  # the engine's new notes (trials handed to PEFT)


@dataclass
class Slot:
    """A worker as planned: where it runs and how much device memory it has (None: not known here)."""

    label: str  # host/device, as TrialResult.placement says it
    device: str
    memory_bytes: int | None = None


# -- the worker -----------------------------------------------------------------------------------


class TrialWorker:
    """An engine with the base loaded once, running tasks of any trial of the sweep."""

    def __init__(self, work: Work, placement: str):
        os.environ.update(work.env)
        self.work = work
        self.placement = placement
        self.engine = make_engine(work.settings.engine, work.model, work.settings,
                                  trust_remote_code=work.trust_remote_code, random_init=work.random_init)
        self.engine.load(work.pad_id)
        self.states: dict = {}
        self._noted = 0

    def describe(self) -> dict:
        return {"placement": self.placement, "device": self.engine.device_name(), "dtype": self.engine.dtype_name,
                "pid": os.getpid()}

    def run(self, trial: Trial, writer: TrialWriter, until: int, final: bool, progress=None) -> Report:
        """Train `trial` to step `until` (starting it when this worker does not hold it); finish it
        when `final` or when it failed."""
        w = self.work
        state = self.states.get(trial.name)
        if state is None:
            writer.placement = self.placement
            state = self.states[trial.name] = self.engine.start(trial, writer, w.training)
        self.engine.advance([state], w.steps, until, w.eval_set, w.settings.eval_every, progress)
        result = None
        if final and state.status is None:
            self._certify(state)
        if final or state.status is not None:
            result = self.engine.finish(self.states.pop(trial.name))
        ev = state.last_eval
        return Report(trial.name, state.step, ev.eval_loss if ev is not None else None, result, self._new_notes())

    def stop(self, name: str, status: TrialStatus, message: str) -> TrialResult:
        return self.engine.finish(self.states.pop(name), status, message)

    def _certify(self, state) -> None:
        """A family's lead, trained: its ΔW cut by SVD to each lower rank, on the same eval batches."""
        ranks = self.work.cuts.get(state.trial.config or state.name)
        if ranks and hasattr(self.engine, "evaluate_cut"):
            cut = {str(r): self.engine.evaluate_cut(state, self.work.eval_set, r) for r in ranks}
            state.certificates = {r: losses for r, losses in cut.items() if losses is not None} or None

    def close(self) -> None:
        self.engine.close()

    def _new_notes(self) -> list[str]:
        notes = self.engine.notes[self._noted:]
        self._noted = len(self.engine.notes)
        return notes


# -- executors ------------------------------------------------------------------------------------


class InProcess:
    """The engine in this process: today's path, with the progress bar per step."""

    kind = "in-process"

    def __init__(self, work: Work, bars, slot: Slot):
        self.work, self.bars, self.slot = work, bars, slot
        self.worker: TrialWorker | None = None
        self.notes: list[str] = []
        self.workers: list[dict] = []

    def start(self) -> None:
        self.worker = TrialWorker(self.work, self.slot.label)
        self.workers = [self.worker.describe()]

    def advance(self, trials: list[tuple[Trial, TrialWriter]], until: int, final: bool,
                label: str | None = None) -> list[Report]:
        reports = []
        for trial, writer in trials:
            self.bars.trial(f"{trial.name} ({label})" if label else trial.name)
            report = self.worker.run(trial, writer, until, final, self.bars.step)
            self._reported(report)
            reports.append(report)
        return reports

    def stop(self, name: str, status: TrialStatus, message: str) -> TrialResult:
        result = self.worker.stop(name, status, message)
        self.bars.done(result)
        return result

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def _reported(self, report: Report) -> None:
        self.notes.extend(n for n in report.notes if n not in self.notes)
        if report.result is not None:
            self.bars.done(report.result)


@dataclass
class _Task:
    trial: Trial
    writer: TrialWriter
    until: int
    final: bool
    attempts: int = 0
    worker: int = 0  # where it last ran


class _Pool(InProcess):
    """Workers elsewhere (processes or Ray actors). One dispatch loop: a free worker takes the next
    task it may run (a trial it holds goes back to it; a new one to any), results come back as they
    finish, and a worker that dies is replaced and its running trial queued again."""

    def __init__(self, work: Work, bars, slots: list[Slot]):
        super().__init__(work, bars, slots[0])
        self.slots = slots
        self.holder: dict[str, int] = {}  # trial -> the worker that holds its state

    # what a pool provides: start its workers, send a call, wait for the next outcome, replace a worker
    def _send(self, w: int, call: tuple) -> None:
        raise NotImplementedError

    def _next(self) -> tuple[int, bool, object]:
        """(worker, ok, reply or the reason it died)."""
        raise NotImplementedError

    def _replace(self, w: int) -> None:
        raise NotImplementedError

    def advance(self, trials, until, final, label=None) -> list[Report]:
        tasks = []
        for trial, writer in trials:
            writer.folder = writer.folder.resolve()  # workers may run elsewhere: the shared folder's full path
            tasks.append(_Task(trial, writer, until, final))
        reports: dict[str, Report] = {}
        for task, reply in self._dispatch(tasks):
            report = reply if isinstance(reply, Report) else self._lost(task, reply)
            self._reported(report)
            reports[task.trial.name] = report
        return [reports[t.name] for t, _ in trials]

    def stop(self, name, status, message) -> TrialResult:
        w = self.holder.pop(name, None)
        if w is None:  # its worker died after the last rung: the adapter went with it
            result = TrialWriter(self._trials_dir / name, name).finish(
                TrialResult(name, status, message + "; its worker was lost, so no adapter was kept"))
        else:
            self._send(w, ("stop", name, status, message))
            _, ok, reply = self._wait_for(w)
            if ok:
                result = reply
            else:
                self._dead(w)
                result = TrialWriter(self._trials_dir / name, name).finish(
                    TrialResult(name, status, f"{message}; its worker died ({reply}) before saving it"))
        self.bars.done(result)
        return result

    def _wait_for(self, w: int):
        while True:
            got = self._next()
            if got[0] == w:
                return got

    def _dispatch(self, tasks: list[_Task]):
        """Run the tasks on free workers; yield (task, Report or the reason its worker died)."""
        if tasks:
            self._trials_dir = tasks[0].writer.folder.parent
        todo, running = list(tasks), {}
        while todo or running:
            for w in range(len(self.slots)):
                if w in running:
                    continue
                task = next((t for t in todo if self.holder.get(t.trial.name, w) == w), None)
                if task is None:
                    continue
                todo.remove(task)
                running[w] = task
                task.attempts, task.worker = task.attempts + 1, w
                self.holder[task.trial.name] = w
                self._send(w, ("run", task.trial, task.writer, task.until, task.final))
            w, ok, reply = self._next()
            task = running.pop(w, None)
            if ok:
                if task is not None:
                    if reply.result is not None:
                        self.holder.pop(task.trial.name, None)
                    yield task, reply
                continue
            self._dead(w)
            if task is None:
                continue
            if task.attempts < ATTEMPTS:
                todo.insert(0, task)
            else:
                yield task, reply

    def _dead(self, w: int) -> None:
        """Worker w died: every trial it held starts again from step 0 wherever it runs next."""
        for name in [n for n, holder in self.holder.items() if holder == w]:
            del self.holder[name]
        self._replace(w)

    def _lost(self, task: _Task, reason) -> Report:
        """A trial whose worker died on every attempt: recorded failed (oom when it was the OOM killer)."""
        oom = "memory" in str(reason).lower()
        message = (f"its worker died {task.attempts} times while running it ({reason}); to try again, delete "
                   f"trials/{task.trial.name}/ and rerun the sweep")
        writer = task.writer
        writer.placement = writer.placement or self.slots[task.worker].label
        result = writer.finish(TrialResult(task.trial.name, TrialStatus.OOM if oom else TrialStatus.FAILED, message,
                                           targets=task.trial.plan.targets, r=task.trial.plan.r,
                                           lora_alpha=task.trial.plan.alpha))
        return Report(task.trial.name, 0, None, result)


def _worker_main(conn, work: Work, placement: str, gpu: str | None, threads: int | None, parent: int) -> None:
    """A local worker process: see only its GPU, load the base, answer calls until told to stop."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        worker = TrialWorker(work, f"{placement} (pid {os.getpid()})")
    except BaseException:  # noqa: BLE001 - the driver reports it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", worker.describe()))
    while True:
        call = conn.recv()
        if call[0] == "close":
            worker.close()
            return
        if call[0] == "run":
            _, trial, writer, until, final = call
            conn.send(("ok", worker.run(trial, writer, until, final)))
        elif call[0] == "stop":
            conn.send(("ok", worker.stop(*call[1:])))


def _exit_with_parent(parent: int) -> None:
    """A worker whose driver died (even by SIGKILL) stops at once: a rerun must not meet it writing."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


class LocalPool(_Pool):
    kind = "local"

    def __init__(self, work, bars, slots, gpus: list[str | None]):
        super().__init__(work, bars, slots)
        import multiprocessing

        self.gpus = gpus
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        cpu_workers = sum(g is None for g in gpus)
        self.threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
        self.procs: list = [None] * len(slots)
        self.conns: list = [None] * len(slots)

    def start(self) -> None:
        for w in range(len(self.slots)):
            self._spawn(w)
        self.workers = [self._ready(w) for w in range(len(self.slots))]

    def _spawn(self, w: int) -> None:
        ours, theirs = self.context.Pipe()
        proc = self.context.Process(target=_worker_main, name=f"loraplan-worker-{w}", daemon=True,
                                    args=(theirs, self.work, self.slots[w].label, self.gpus[w], self.threads,
                                          os.getpid()))
        proc.start()
        theirs.close()
        self.procs[w], self.conns[w] = proc, ours

    def _ready(self, w: int) -> dict:
        from ..errors import RunError

        try:
            kind, info = self.conns[w].recv()
        except EOFError:
            raise RunError(f"worker {self.slots[w].label} died while loading the model "
                           f"(exit code {self.procs[w].exitcode})") from None
        if kind == "error":
            raise RunError(f"worker {self.slots[w].label} could not load the model: "
                           f"{info.strip().splitlines()[-1]}")
        return info

    def _send(self, w, call) -> None:
        try:
            self.conns[w].send(call)
        except (BrokenPipeError, OSError):
            pass  # _next sees it dead

    def _next(self):
        from multiprocessing.connection import wait

        by_handle = {}
        for w, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True)):
            by_handle[conn] = w
            by_handle[proc.sentinel] = w
        ready = wait(list(by_handle))
        for handle in ready:
            w = by_handle[handle]
            conn = self.conns[w]
            if conn.poll():
                try:
                    _, reply = conn.recv()
                    return w, True, reply
                except (EOFError, OSError):
                    pass
            if not self.procs[w].is_alive():
                self.procs[w].join()
                return w, False, f"exit code {self.procs[w].exitcode}"
        return self._next()

    def _replace(self, w: int) -> None:
        self.conns[w].close()
        self._spawn(w)
        self._ready(w)

    def close(self) -> None:
        for w, conn in enumerate(self.conns):
            if conn is not None and self.procs[w].is_alive():
                self._send(w, ("close",))
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout=10)  # an idle worker closes at once; one still in a trial (Ctrl-C) is killed
                if proc.is_alive():
                    proc.kill()


class _RayWorker(TrialWorker):
    """The Ray actor: a TrialWorker whose placement names the node and GPU Ray gave it."""

    def __init__(self, work: Work):
        import ray

        ids = ray.get_gpu_ids()
        node = ray.get_runtime_context().get_node_id()[:8]
        device = f"cuda:{','.join(map(str, ids))}" if ids else "cpu"
        super().__init__(work, f"{socket.gethostname()}/{device} (ray node {node}, pid {os.getpid()})")


class RayPool(_Pool):
    kind = "ray"

    def __init__(self, work, bars, slots, ray, gpus_per_worker: float):
        super().__init__(work, bars, slots)
        self.ray = ray
        self.actor_class = ray.remote(_RayWorker).options(
            num_gpus=gpus_per_worker, num_cpus=1, max_restarts=0, max_task_retries=0)
        self.actors: list = [None] * len(slots)
        self.running: dict = {}  # ObjectRef -> worker

    def start(self) -> None:
        work = self.ray.put(self.work)
        self._work_ref = work
        self.actors = [self.actor_class.remote(work) for _ in self.slots]
        self.workers = self._describe(range(len(self.actors)))
        for w, info in enumerate(self.workers):
            self.slots[w] = Slot(info["placement"], info["device"])

    def _describe(self, which) -> list[dict]:
        from ..errors import RunError

        try:
            return self.ray.get([self.actors[w].describe.remote() for w in which])
        except self.ray.exceptions.RayError as e:
            raise RunError(f"a Ray worker could not load the model: {str(e).strip().splitlines()[-1]}") from None

    def _send(self, w, call) -> None:
        name, *args = call
        self.running[getattr(self.actors[w], name).remote(*args)] = w

    def _next(self):
        ray = self.ray
        ready, _ = ray.wait(list(self.running), num_returns=1)
        ref = ready[0]
        w = self.running.pop(ref)
        try:
            return w, True, ray.get(ref)
        except ray.exceptions.OutOfMemoryError as e:
            return w, False, f"out of memory: Ray's memory monitor killed it ({_first_line(e)})"
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as e:
            return w, False, _first_line(e)
        except ray.exceptions.RayTaskError as e:  # the worker raised outside a trial's own handling
            return w, False, _first_line(e)

    def _replace(self, w: int) -> None:
        try:
            self.ray.kill(self.actors[w])
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[w] = self.actor_class.remote(self._work_ref)

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                try:
                    self.ray.kill(actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass


def _first_line(error) -> str:
    lines = [x for x in str(error).strip().splitlines() if x.strip()]
    return lines[0][:200] if lines else type(error).__name__


# -- choosing and planning ------------------------------------------------------------------------


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed", RAY_INSTALL) from None
    return ray


def connect_ray(address: str | None):
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"cannot join the Ray cluster at {address}: {_first_line(e)}",
                             "check --ray-address (host:port of the head node, or ray://host:10001)") from None
    return ray


@dataclass
class Placement:
    """Which workers the sweep will use, and which trial each takes first."""

    kind: str  # in-process, local, ray
    slots: list[Slot]
    gpus: list[str | None] = field(default_factory=list)  # local: the CUDA_VISIBLE_DEVICES of each worker
    gpus_per_worker: float = 0.0  # ray

    def plan(self, preview: list[dict]) -> list[dict]:
        """Trial i on worker i mod n (the queue then gives the next trial to the first free worker),
        with the trial's memory estimate against its device's memory."""
        rows = []
        for i, p in enumerate(preview):
            slot = self.slots[i % len(self.slots)]
            need = p.get("memory_bytes")
            fits = None if need is None or slot.memory_bytes is None else need <= slot.memory_bytes
            rows.append({"trial": p["name"], "worker": slot.label, "device": slot.device,
                         "memory_bytes": need, "device_memory_bytes": slot.memory_bytes, "fits": fits})
        return rows


def place(settings: ExecutorSettings, trials: int) -> Placement:
    """The workers the settings ask for, checked against this machine (or the Ray cluster)."""
    host = socket.gethostname()
    if settings.kind == "ray":
        if settings.gpus is not None:
            raise UsageError("--gpus picks this machine's GPUs for --executor local",
                             "on Ray, --gpus-per-trial and --workers say how many GPUs each worker and the sweep use")
        return _place_ray(settings, trials)
    if settings.ray_address is not None or settings.workers is not None:
        flag = "--ray-address" if settings.ray_address is not None else "--workers"
        raise UsageError(f"{flag} is for --executor ray", f"add --executor ray, or leave {flag} out (here --gpus "
                                                          "says which GPUs, one worker each)")
    if settings.gpus and settings.gpus.startswith("cpu:"):
        n = min(int(settings.gpus[4:]), max(trials, 1))
        return Placement("local", [Slot(f"{host}/cpu-worker-{k}", "cpu") for k in range(n)], [None] * n)
    import torch

    count = torch.cuda.device_count()
    if settings.gpus is None:
        if count <= 1:
            return Placement("in-process", [_cuda_slot(host, 0) if count else Slot(f"{host}/cpu", "cpu")])
        chosen = list(range(count))
    else:
        chosen = [int(g) for g in settings.gpus.split(",")]
        missing = [g for g in chosen if g >= count]
        if missing:
            have = f"{count} ({', '.join(map(str, range(count)))})" if count else "none"
            raise UsageError(f"--gpus {settings.gpus}: no GPU {', '.join(map(str, missing))}; this machine's visible "
                             f"CUDA GPUs: {have}",
                             "leave --gpus out to use every GPU" if count else "--gpus cpu:N runs N CPU worker "
                                                                               "processes")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    chosen = chosen[:max(trials, 1)]
    return Placement("local", [_cuda_slot(host, g) for g in chosen],
                     [visible[g] if g < len(visible) else str(g) for g in chosen])


def _cuda_slot(host: str, index: int) -> Slot:
    import torch

    props = torch.cuda.get_device_properties(index)
    return Slot(f"{host}/cuda:{index}", props.name, props.total_memory)


def _place_ray(settings: ExecutorSettings, trials: int) -> Placement:
    ray = connect_ray(settings.ray_address)
    per_node = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        per_node.append((node.get("NodeManagerHostname") or node.get("NodeManagerAddress", "?"),
                         res.get("GPU", 0), res.get("CPU", 0),
                         next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)))
    gpus = sum(n[1] for n in per_node)
    per = settings.gpus_per_trial if gpus else 0.0
    slots = []
    for host, n_gpu, n_cpu, accel in per_node:
        count = int(n_gpu // per) if per else int(n_cpu)
        for k in range(count):
            slots.append(Slot(f"{host}/{'gpu' if per else 'cpu'} slot {k}", f"GPU {accel}" if per and accel
                              else ("GPU" if per else "cpu")))
    if not slots:
        raise UsageError(f"the Ray cluster has no room for a worker ({gpus:g} GPUs, {per:g} per trial)",
                         "lower --gpus-per-trial, or add nodes")
    # across nodes in turn, so that a small sweep spreads out
    slots.sort(key=lambda s: int(s.label.rsplit(" ", 1)[1]))
    n = min(len(slots), max(trials, 1), settings.workers or len(slots))
    return Placement("ray", slots[:n], gpus_per_worker=per)


def make_executor(placement: Placement, work: Work, bars) -> InProcess:
    if placement.kind == "in-process":
        return InProcess(work, bars, placement.slots[0])
    if placement.kind == "local":
        return LocalPool(work, bars, list(placement.slots), placement.gpus)
    return RayPool(work, bars, list(placement.slots), import_ray(), placement.gpus_per_worker)
