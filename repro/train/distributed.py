"""torch.distributed set-up from SLURM (as submitit sets it) or torchrun variables.

One process per GPU (or per CPU worker in tests). Rank 0 alone logs metrics, writes checkpoints
and runs the checks before training (`check_on_master`); every rank computes. `effective_update_freq` keeps the paper's effective batch
when an experiment runs on fewer GPUs than the paper used (fairseq README: simulate N GPUs with
world_size=k and update_freq=N/k).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job, as read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "slurm", "torchrun" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty")
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, bracket = match.group(1), match.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    if "MASTER_PORT" in environ:
        return int(environ["MASTER_PORT"])
    # Derived from the job id so that two jobs sharing a node do not collide (fairseq does the same).
    job_id = environ.get("SLURM_JOB_ID", "0")
    digits = re.sub(r"\D", "", job_id) or "0"
    return 10000 + int(digits[-4:]) % 20000


def detect_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Read rank/world size from torchrun's variables, else SLURM's, else a single process.

    torchrun wins when both are present: under `srun torchrun`, SLURM_PROCID counts nodes while
    RANK counts processes.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env:
            master_addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
        else:
            master_addr = "127.0.0.1"
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=master_addr,
            master_port=_slurm_master_port(env),
            source="slurm",
        )
    return DistributedEnv(0, 1, 0, "127.0.0.1", DEFAULT_MASTER_PORT, "single")


@dataclass
class DistributedContext:
    """What the trainer needs to know about the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(cpu: bool, local_rank: int) -> torch.device:
    if not cpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(
    cpu: bool = False, backend: str | None = None, expected_world_size: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedContext:
    """Join (or, for one process, skip) the process group; NCCL on GPU, gloo on CPU by default."""
    env = detect_env(environ)
    if expected_world_size is not None and expected_world_size > 1 and env.world_size != expected_world_size:
        log.warning(
            "distributed_training.distributed_world_size=%d but the environment (%s) has %d processes; "
            "using the environment's", expected_world_size, env.source, env.world_size,
        )
    device = pick_device(cpu, env.local_rank)
    if env.world_size == 1:
        return DistributedContext(0, 1, env.local_rank, device, initialized_here=False)
    if dist.is_initialized():  # e.g. tests that spawn their own group
        return DistributedContext(dist.get_rank(), dist.get_world_size(), env.local_rank, device, False)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
    )
    log.info("rank %d/%d joined (%s, %s, master %s:%d)", env.rank, env.world_size, env.source, backend,
             env.master_addr, env.master_port)
    return DistributedContext(env.rank, env.world_size, env.local_rank, device, initialized_here=True)


def context_from_initialized_group(device: torch.device | None = None) -> DistributedContext:
    """Context for a process group someone else already initialised (tests, notebooks)."""
    if not dist.is_initialized():
        return DistributedContext(device=device or torch.device("cpu"))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), 0, device or torch.device("cpu"), False)


def effective_update_freq(paper_world_size: int | None, world_size: int, update_freq: int) -> int:
    """update_freq that keeps the paper's effective batch (paper_world_size x update_freq GPUs' worth).

    64 paper GPUs on 8 -> update_freq x8. Raises if the paper's GPU count is not a multiple of ours,
    since the effective batch could then not be kept exactly.
    """
    if world_size < 1 or update_freq < 1:
        raise ValueError(f"world_size and update_freq must be >= 1 (got {world_size}, {update_freq})")
    if paper_world_size is None or paper_world_size == world_size:
        return update_freq
    if paper_world_size % world_size != 0:
        raise ValueError(
            f"distributed_training.paper_world_size={paper_world_size} is not a multiple of the world size "
            f"{world_size}; the paper's effective batch cannot be kept exactly"
        )
    return update_freq * paper_world_size // world_size


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    """Sum a list of floats over ranks (float64, on the context's device)."""
    if not context.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_from_master(obj: object, context: DistributedContext) -> object:
    """Rank 0's `obj` on every rank (what the others pass is ignored)."""
    if not context.is_distributed:
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def check_on_master(check: Callable[[], None], context: DistributedContext,
                    broadcast: Callable[[object, DistributedContext], object] = broadcast_from_master) -> None:
    """Run `check` (which raises to refuse) on rank 0 alone; every other rank waits for its outcome and raises
    the same refusal, so all ranks stop together (none is left waiting at its first collective) and the work,
    e.g. reading every audio header of a split, is not repeated once per rank."""
    refusal: Exception | None = None
    if context.is_master:
        try:
            check()
        except Exception as error:  # noqa: BLE001  (any refusal must reach the waiting ranks)
            refusal = error
    if context.is_distributed:
        sent = broadcast(_picklable(refusal) if context.is_master else None, context)
        if not context.is_master:
            refusal = sent  # type: ignore[assignment]
    if refusal is not None:
        raise refusal


def _picklable(error: Exception | None) -> Exception | None:
    """`error` itself when it pickles (AudioError and the built-in errors do), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"rank 0: {type(error).__name__}: {error}")


def all_gather_objects(obj: object, context: DistributedContext) -> list[object]:
    """Gather one picklable object from every rank (used for per-rank RNG states in checkpoints)."""
    if not context.is_distributed:
        return [obj]
    gathered: list[object] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
