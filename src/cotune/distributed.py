"""Training on several processes: how many, how each optimizer step's sequences are split between them, the launch
through PyTorch's own launcher (torchrun), and the few decisions every process must share. Data parallelism is
PyTorch DDP as transformers' Trainer sets it up (NCCL between GPUs, gloo between CPU processes); nothing here
replaces it. Imports only the standard library at module level, so the settings check can use it."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .cpu import threads_per_process
from .errors import UserError

# Set by the launcher for the processes it starts: where they leave their user errors for it to print once.
LAUNCH_DIR_ENV = "COTUNE_TRAIN_LAUNCH_DIR"
# How a step's sequences are shared out between the processes (cotune.sampling). Every way draws the same global set
# of sequences per step from the seed, whatever the number of processes, and cotune uses it on one process too, so a
# run's steps see the same sequences on 1 or N processes.
SPLITS = {
    "tokens": "by tokens: every micro-batch of every process about the same (cotune.sampling)",
    "batch_rebalance": "transformers' batch_rebalance: runs of rows sorted by length, equal padded cost",
    "random": "transformers' default: shuffled rows dealt round-robin in equal micro-batches",
}


def split_sequences(batch: int, accum: int, world: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation) per process that keeps BATCH_SIZE x GRAD_ACCUM sequences per optimizer step over
    `world` processes, the micro-batch no larger than BATCH_SIZE (the memory knob); None when it can't be exact."""
    total = batch * accum
    if total % world:
        return None
    per_process = total // world
    micro = max(d for d in range(1, min(batch, per_process) + 1) if per_process % d == 0)
    return micro, per_process // micro


def uneven_split_message(batch: int, accum: int, world: int, processes: str) -> str:
    """Why BATCH_SIZE x GRAD_ACCUM can't be split over `world` processes, with the nearest combinations that can."""
    total = batch * accum
    below, above = total - total % world, total - total % world + world
    options = []
    for target in (below, above):
        if target <= 0:
            continue
        micro = max(d for d in range(1, min(batch, target) + 1) if target % d == 0)
        options.append(f"{target} (BATCH_SIZE={micro} GRAD_ACCUM={target // micro})")
    counts = [str(n) for n in range(1, total + 1) if total % n == 0]
    plural = "s" if total > 1 else ""
    return (f"BATCH_SIZE={batch} x GRAD_ACCUM={accum} = {total} sequence{plural} per optimizer step can't be split "
            f"evenly over {world} processes ({processes}); nearest sequences per step that can: "
            f"{' or '.join(options)}; or keep {total} on {', '.join(counts)} process{'es' if plural else ''}")


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's sequences spread over the processes (the run record keeps it)."""
    nnodes: int
    nproc_per_node: int
    micro_batch: int  # sequences per micro-batch on each process (on average: the sampler varies it by length)
    grad_accum: int   # micro-batches per optimizer step on each process

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def record(self) -> dict:
        return {**asdict(self), "world_size": self.world_size, "sequences_per_step": self.sequences_per_step}

    def describe(self) -> str:
        where = f"{self.nnodes} machines x {self.nproc_per_node}" if self.nnodes > 1 else f"{self.nproc_per_node}"
        return (f"{self.sequences_per_step} sequences per optimizer step = {self.micro_batch} per micro-batch x "
                f"{self.grad_accum} accumulation x {self.world_size} processes ({where})")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(setting: str) -> int:
    """NPROC_PER_NODE as a number: `auto` is one process per visible GPU (one on a machine without one)."""
    if setting != "auto":
        count = int(setting)
        gpus = visible_gpus() if count > 1 else 0
        if count > 1 and 0 < gpus < count:
            raise UserError(f"NPROC_PER_NODE={count}: only {gpus} GPUs are visible here and each process trains on "
                            f"its own GPU; use NPROC_PER_NODE={gpus} or auto")
        return count
    gpus = visible_gpus()
    if gpus == 0:
        print("NPROC_PER_NODE=auto: no GPU visible, one training process", file=sys.stderr)
    return max(1, gpus)


def plan(settings, nproc_per_node: int | None = None, nnodes: int | None = None) -> Layout:
    """The layout for these settings; an uneven split is refused with the nearest combinations that keep it exact."""
    nproc = processes_per_node(settings.nproc_per_node) if nproc_per_node is None else nproc_per_node
    nodes = settings.nnodes if nnodes is None else nnodes
    world = nproc * nodes
    split = split_sequences(settings.batch_size, settings.grad_accum, world)
    if split is None:
        processes = f"NPROC_PER_NODE={nproc} x NNODES={nodes}"
        raise UserError(uneven_split_message(settings.batch_size, settings.grad_accum, world, processes))
    return Layout(nodes, nproc, *split)


# ------------------------------------------------------------------------------------------------ inside a process
@dataclass(frozen=True)
class Process:
    """This process's place in the run, as torchrun's environment tells it (one process: rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0  # rank 0 alone writes outputs

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and "RANK" in os.environ


def this_process() -> Process:
    if not under_torchrun():
        return Process()
    env = os.environ
    return Process(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]),
                   int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def launched() -> bool:
    """True in a process that cotune's launcher started (it holds the stage lock and prints user errors)."""
    return bool(os.environ.get(LAUNCH_DIR_ENV))


def die_with_launcher() -> None:
    """A process started by the launcher ends when the launcher does, even by SIGKILL (Linux): torchrun starts each
    worker in its own session, so a kill of the launcher's process group would not reach it."""
    if not sys.platform.startswith("linux") or not launched():
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


def start_process_group(process: Process, device: str) -> None:
    """Join the other processes: NCCL between GPUs (one per process), gloo between CPU processes."""
    if not process.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(process.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", process.local_rank))
    else:
        dist.init_process_group("gloo")


def end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decided_by_writer(process: Process, decide: Callable[[], Any]) -> Any:
    """Run `decide` on rank 0 only (it may write); every rank gets its result, or raises its user error, so no rank is
    left waiting on one that failed."""
    if not process.distributed:
        return decide()
    import torch.distributed as dist

    payload: list = [None]
    if process.is_writer:
        try:
            payload = [("ok", decide())]
        except UserError as err:
            payload = [("error", str(err))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise UserError(value)
    return value


def on_every_process(process: Process, work: Callable[[], Any]) -> Any:
    """Run `work` on every rank; a user error on any of them is raised on all (none is left waiting for it)."""
    try:
        value, problem = work(), None
    except UserError as err:
        value, problem = None, str(err)
    problems = [p for p in gathered(process, problem) if p]
    if problems:
        raise UserError(problems[0])
    return value


def gathered(process: Process, value: Any) -> list:
    """`value` from every rank, in rank order (every rank calls this)."""
    if not process.distributed:
        return [value]
    import torch.distributed as dist

    out: list = [None] * process.world_size
    dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------------------------------------ the launcher
def torchrun_arguments(settings, layout: Layout, script: str, script_args: list[str]) -> list[str]:
    """torchrun's command line: one node on its own (a free local port), or NNODES machines that meet at
    MASTER_ADDR:MASTER_PORT with this one as NODE_RANK (static rendezvous, so node 0 holds ranks 0..N-1)."""
    if layout.nnodes == 1:
        where = ["--standalone", "--nnodes", "1"]
    else:
        where = ["--nnodes", str(layout.nnodes), "--node-rank", str(settings.node_rank),
                 "--master-addr", settings.master_addr, "--master-port", str(settings.master_port)]
    return [*where, "--nproc-per-node", str(layout.nproc_per_node), "--max-restarts", "0", script, *script_args]


def launch(settings, layout: Layout, script: str, script_args: list[str]) -> None:
    """Run `script` on this node's processes through torchrun (in this process: its agent starts and watches them).
    A user error in any of them comes back as one UserError here; a crash keeps the crashed process's traceback."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs every step of the rendezvous and each failure as a table; the outcome is said here
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(layout.nproc_per_node)))
    with tempfile.TemporaryDirectory(prefix="cotune-launch-") as launch_dir:
        os.environ[LAUNCH_DIR_ENV] = launch_dir
        try:
            run(parse_args(torchrun_arguments(settings, layout, script, script_args)))
        except ChildFailedError as failed:
            messages = []
            for path in sorted(Path(launch_dir).glob("error-*.txt")):
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line not in messages:
                        messages.append(line)
            if messages:
                raise UserError("\n".join(messages)) from None
            codes = {rank: f.exitcode for rank, f in failed.failures.items()}
            raise SystemExit(f"error: training process(es) failed, exit codes by rank {codes}; the failing "
                             "process's own output is above") from None
        finally:
            os.environ.pop(LAUNCH_DIR_ENV, None)


def report_user_error(process: Process, message: str) -> bool:
    """In a process the launcher started, leave the user error for the launcher to print once; True if left."""
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if not launch_dir or not Path(launch_dir).is_dir():
        return False
    (Path(launch_dir) / f"error-{process.rank}.txt").write_text(message + "\n", encoding="utf-8")
    return True
