"""Run an experiment on SLURM through submitit: submit, run inside the job, survive preemption.

`python -m repro experiment=X cluster=slurm_v100` (repro/cli.py) calls `submit`: the composed
config is resolved and frozen in `<run_dir>/slurm/job_config.yaml` (a requeued job trains with
exactly what was submitted, whatever happens to conf/ or the environment meanwhile), and one
SLURM job with one task per GPU runs `SlurmStageJob` in every task. Each task starts
`python -m repro` on the frozen config in the same run directory; that process sees
`inside_slurm_job()` and runs the stages itself, joining DDP from the SLURM variables
(repro/train/distributed.py).

Preemption and time limits (submitit's checkpointing protocol): on the time-limit signal (USR2,
or USR1) submitit calls `SlurmStageJob.checkpoint`, which asks the trainer to save
(repro/launch/preemption.py), waits for it, and hands submitit the same job to requeue. On SIGTERM
(preemption, `scontrol requeue`) the request is made the same way and SLURM requeues the job
itself. Either way the requeued job resumes from `checkpoints/checkpoint_last.pt` of the same run
directory, and the trackers continue their runs (they keep their run ids in the run directory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from repro.launch.plan import LaunchPlan, describe_selection, executor_parameters, plan_launch
from repro.launch.preemption import clear_stop_request, request_stop, stop_requested
from repro.launch.pseudo_label import describe_pseudo_label, submit_labelling

JOB_MARKER_ENV = "REPRO_SLURM_JOB"
"""Set to 1 for the training process a SlurmStageJob starts."""
SUBMIT_DIR = "slurm"
"""`<run_dir>/slurm`: frozen config, submitit pickles, sbatch script and logs of every task."""
FROZEN_CONFIG_NAME = "job_config"
STOP_GRACE_S = 100  # of the 120 s between the time-limit signal and the kill
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def inside_slurm_job() -> bool:
    """True in a process that should run the stages here: the training process of a SlurmStageJob,
    or any SLURM task (srun, hydra-submitit-launcher jobs), which already holds its allocation."""
    if os.environ.get(JOB_MARKER_ENV) == "1":
        return True
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ


# --- dry run ------------------------------------------------------------------------------------


def _sbatch_lines(cfg: DictConfig, plan: LaunchPlan, folder: Path) -> list[str]:
    """The #SBATCH lines submitit would write (rendered by submitit itself, nothing submitted)."""
    with tempfile.TemporaryDirectory() as scratch:
        executor = submitit.AutoExecutor(folder=scratch, cluster="slurm",
                                         slurm_max_num_timeout=plan.max_num_timeout)
        executor.update_parameters(**executor_parameters(cfg, plan), slurm_additional_parameters={"requeue": True})
        text = executor._executor._make_submission_file_text("python -m repro", "dry-run")
    return [line.replace(scratch, str(folder)) for line in text.splitlines() if line.startswith("#SBATCH")]


def _hours(value: float) -> str:
    return f"{value:,.1f} h" if value < 48 else f"{value:,.1f} h ({value / 24:.1f} days)"


def describe_plan(cfg: DictConfig) -> str:
    """What `submit` would do (or a local run does), for `dry_run=true`: nothing is submitted."""
    lines = [f"experiment: {cfg.experiment}   stages: {', '.join([cfg.stage] if cfg.stage else cfg.stages)}"]
    try:
        plan = plan_launch(cfg)
    except ValueError as error:
        return "\n".join([*lines, f"cannot launch: {error}"])
    if plan.cluster == "slurm":
        lines.append(f"cluster: slurm via submitit ({plan.nodes} node(s) x {plan.tasks_per_node} task(s), "
                     f"one task per GPU{'' if plan.gpus_per_node else '; CPU only'})")
        lines.append("sbatch parameters:")
        try:
            lines += ["  " + line for line in _sbatch_lines(cfg, plan, Path("<run_dir>") / SUBMIT_DIR)]
        except Exception as error:  # submitit missing or rejecting a value: say so, keep the rest of the plan
            lines.append(f"  (could not render: {error})")
    else:
        lines.append(f"cluster: {plan.cluster} (this machine; torchrun sets the world size)")
    if plan.requested_gpus_per_node not in (None, plan.gpus_per_node):
        lines.append(f"note: using {plan.gpus_per_node} of the {plan.requested_gpus_per_node} GPUs per node so that the "
                     f"paper's {plan.paper_world_size} GPUs' batch is kept exactly")
    lines.append(f"world size: {plan.world_size} process(es)  -> distributed_training.distributed_world_size")
    reference = "not set" if plan.paper_world_size is None else (
        f"{plan.paper_world_size} GPUs [{plan.world_size_source or 'source not given'}]")
    lines.append(f"update_freq: {plan.update_freq}  (configured {plan.configured_update_freq}; reference world size "
                 f"{reference}; {plan.world_size} x {plan.update_freq} here)")
    if plan.batch_samples is not None:
        lines.append(f"effective batch: <= {plan.batch_samples:,} samples = {plan.batch_seconds:,.1f} s "
                     f"({plan.batch_seconds / 3600:.2f} h) of audio per update "
                     f"(max_tokens {plan.max_tokens:,} x {plan.world_size} x {plan.update_freq})")
    compute_source = plan.compute_source or "source not given"
    if plan.paper_gpu_hours is not None:
        lines.append(f"reference compute [{compute_source}]: {plan.paper_gpus} x {plan.paper_gpu_type or 'GPU'} x "
                     f"{_hours(plan.paper_hours)} = {plan.paper_gpu_hours:,.0f} GPU-hours")
        gpu = plan.gpu_type or "GPU"
        estimate = (f"estimate here: {_hours(plan.estimated_hours)} on {plan.world_size} x {gpu} at the reference "
                    f"run's per-GPU speed")
        if plan.cluster == "slurm" and plan.estimated_jobs is not None:
            estimate += f"; {plan.estimated_jobs} SLURM run(s) of {plan.timeout_min} min (requeued in between)"
        lines.append(estimate)
    else:
        lines.append(f"reference compute [{compute_source}]: {plan.paper_gpus or '?'} x {plan.paper_gpu_type or 'GPU'}, "
                     "hours not given")
    selection = describe_selection(cfg)
    if selection is not None:
        lines.append(selection)
    if "pseudo_label" in ([cfg.stage] if cfg.stage else cfg.stages):
        lines += describe_pseudo_label(cfg)
    lines.append("resolved config:")
    lines.append(OmegaConf.to_yaml(_job_config(cfg, plan), resolve=True).rstrip())
    return "\n".join(lines)


# --- submission ---------------------------------------------------------------------------------


def _job_config(cfg: DictConfig, plan: LaunchPlan) -> DictConfig:
    """The resolved config the job runs: the plan's world size written in."""
    job_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    job_cfg.distributed_training.distributed_world_size = plan.world_size
    job_cfg.dry_run = False
    return job_cfg


def freeze_config(cfg: DictConfig, plan: LaunchPlan, folder: Path, name: str = FROZEN_CONFIG_NAME) -> Path:
    """Write the job's config as a primary Hydra config validated by the same schema."""
    folder.mkdir(parents=True, exist_ok=True)
    frozen = OmegaConf.create({"defaults": ["repro_schema", "_self_"]})
    frozen.merge_with(_job_config(cfg, plan))
    path = folder / f"{name}.yaml"
    path.write_text("# Frozen at submission by repro/launch/slurm.py; the job (and every requeue) runs this.\n"
                    + OmegaConf.to_yaml(frozen))
    return path


def _override_value(value: str) -> str:
    """Quote a path for a Hydra command-line override."""
    if any(character in value for character in "'\\$"):
        raise ValueError(f"run directory {value!r} contains a quote, backslash or '$'; choose another hydra.run.dir")
    return f"'{value}'"


def submit(cfg: DictConfig, run_dir: Path) -> int:
    """Submit the configured stages as one SLURM job; print its id. Returns a process exit code."""
    try:
        submit_job(cfg, run_dir)
    except ValueError as error:
        print(f"repro: cannot launch {cfg.experiment}: {error}", file=sys.stderr)
        return 2
    return 0


def submit_job(cfg: DictConfig, run_dir: Path, after: Sequence[str] = (), config_name: str = FROZEN_CONFIG_NAME,
               cancel_with_dependency: bool = False) -> str:
    """Submit the configured stages as one SLURM job, started only once the jobs `after` succeeded; returns its id.

    `config_name` names the frozen config (jobs of one run directory that run different stages need their
    own); `cancel_with_dependency` has SLURM cancel the job when a job it waits for fails, instead of
    leaving it pending for ever. Raises ValueError when the plan cannot keep the paper's batch on this cluster."""
    plan = plan_launch(cfg)
    run_dir = Path(run_dir).absolute()
    folder = run_dir / SUBMIT_DIR
    freeze_config(cfg, plan, folder, config_name)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=plan.max_num_timeout)
    additional: dict[str, Any] = {"requeue": True}
    if after:
        additional["dependency"] = "afterok:" + ":".join(after)
        if cancel_with_dependency:
            additional["kill-on-invalid-dep"] = "yes"
    executor.update_parameters(**executor_parameters(cfg, plan), slurm_additional_parameters=additional)
    job = executor.submit(SlurmStageJob(str(folder), config_name, str(run_dir), str(Path.cwd())))
    with (folder / "job_ids").open("a") as ids:
        ids.write(f"{job.job_id}\n")
    print(f"repro: submitted {cfg.experiment} as SLURM job {job.job_id} ({plan.world_size} task(s), "
          f"update_freq {plan.update_freq}); run dir {run_dir}; logs {folder}/{job.job_id}_*_log.out", flush=True)
    return str(job.job_id)


MERGE_CONFIG_NAME = "pseudo_label_merge"


def submit_self_training(cfg: DictConfig, run_dir: Path, stages: Sequence[str]) -> int:
    """Stage pseudo_label on SLURM without waiting: the unfinished shards as one job array, the merge as a
    CPU job that starts once every array task succeeded (`afterok`), the row's other stages as one job after
    the merge; print the job ids and how to follow them, and return (exit code).

    A failed shard cancels the jobs after it (kill-on-invalid-dep); re-running the same command submits
    only the shards without a marker. `self_training.wait=true` waits here instead (and retries failed shards).
    """
    run_dir = Path(run_dir).absolute()
    try:
        submitted = submit_labelling(cfg, run_dir)
        merge_cfg = OmegaConf.merge(cfg, {"stage": "pseudo_label", "cluster": {"nodes": 1, "gpus_per_node": 0},
                                          "distributed_training": {"paper_world_size": None}})
        after = [submitted["array"]] if submitted["array"] else []
        merge = submit_job(merge_cfg, run_dir, after=after, config_name=MERGE_CONFIG_NAME, cancel_with_dependency=True)
        rest = [stage for stage in stages if stage != "pseudo_label"]
        row = (submit_job(OmegaConf.merge(cfg, {"stage": None, "stages": rest}), run_dir, after=[merge],
                          cancel_with_dependency=True) if rest else None)
    except ValueError as error:
        print(f"repro: cannot launch {cfg.experiment}: {error}", file=sys.stderr)
        return 2
    jobs = [job for job in (submitted["array"], merge, row) if job]
    print(f"repro: pseudo_label of {cfg.experiment}: shard array {submitted['array'] or '(none: every shard is done)'} "
          f"({submitted['todo']} of {submitted['shards']} shard(s)), merge job {merge} after it"
          + (f", then {', '.join(rest)} as job {row}" if row else "")
          + f". Follow with: squeue -j {','.join(jobs)}; shard logs in {submitted['folder']}, merge and row logs in "
          f"{run_dir / SUBMIT_DIR}; results in {submitted['output_dir']}/summary.json", flush=True)
    return 0


# --- inside the job -----------------------------------------------------------------------------


def _ignore_stop_signals() -> None:
    """In the training process before exec: SIG_IGN survives exec, so SLURM's signals to the whole
    job cannot kill it in the middle of a checkpoint write; the launcher relays them as a request."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _exited(pid: int) -> bool:
    """Has `pid` exited? Does not reap it (safe inside a signal handler while Popen.poll runs)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class SlurmStageJob(submitit.helpers.Checkpointable):
    """The submitit job: run `python -m repro` on the frozen config, relay stop requests.

    Checkpointable in submitit's sense (it has `checkpoint`): on the time-limit signal submitit
    calls it, requeues the job it returns and exits.
    """

    def __init__(self, config_dir: str, config_name: str, run_dir: str, cwd: str) -> None:
        self.config_dir = config_dir
        self.config_name = config_name
        self.run_dir = run_dir
        self.cwd = cwd
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_child"] = None  # a process does not travel with a requeue
        return state

    def command(self) -> list[str]:
        return [sys.executable, "-m", "repro", "--config-path", self.config_dir, "--config-name", self.config_name,
                f"hydra.run.dir={_override_value(self.run_dir)}"]

    def __call__(self) -> str:
        if int(os.environ.get("SLURM_PROCID", "0")) == 0:
            clear_stop_request(self.run_dir)  # left by the run before a requeue
        # USR1 is treated like submitit's own time-limit signal (USR2): save, then requeue.
        time_limit_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        submitit_handler = signal.getsignal(time_limit_signal)
        if callable(submitit_handler) and time_limit_signal != signal.SIGUSR1:
            signal.signal(signal.SIGUSR1, submitit_handler)
        signal.signal(signal.SIGTERM, self._on_terminate)

        environment = dict(os.environ, **{JOB_MARKER_ENV: "1"})
        self._child = subprocess.Popen(self.command(), cwd=self.cwd, env=environment,
                                       preexec_fn=_ignore_stop_signals)
        while (code := self._child.poll()) is None:
            time.sleep(0.5)
        reason = stop_requested(self.run_dir)
        if code == 0:
            return self.run_dir
        if reason is not None:
            raise submitit.core.utils.UncompletedJobError(f"stopped on request ({reason}); the run resumes from "
                                      f"{self.run_dir}/checkpoints when the job is requeued")
        raise RuntimeError(f"`{' '.join(self.command())}` exited with code {code}; see the task logs in "
                           f"{self.config_dir}")

    def _on_terminate(self, signum: int, frame: Any) -> None:
        """SIGTERM (preemption, scontrol requeue, scancel): ask for a checkpoint; SLURM does the rest."""
        request_stop(self.run_dir, f"{signal.Signals(signum).name} (job {os.environ.get('SLURM_JOB_ID', '?')})")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on the time-limit signal: have the trainer save, then requeue this job."""
        request_stop(self.run_dir, f"time limit / preemption signal (job {os.environ.get('SLURM_JOB_ID', '?')})")
        child = self._child
        if child is not None:
            deadline = time.time() + STOP_GRACE_S
            while not _exited(child.pid) and time.time() < deadline:
                time.sleep(0.2)
            if not _exited(child.pid):  # no save on request: resume from the last interval checkpoint
                child.kill()
        return submitit.helpers.DelayedSubmission(
            SlurmStageJob(self.config_dir, self.config_name, self.run_dir, self.cwd))
