"""Training one hypernetwork on several processes with torch.distributed.

Each process runs its share of the trajectories of an optimizer step in
lockstep with the others; at each step they average the network's gradients
and pool the normaliser's statistics, so every process takes the same step
and holds the same network. Launched by torchrun (`lledit train --nproc N`
calls it): one process per GPU, or several on one CPU.

The gradients are all-reduced by hand rather than through
`DistributedDataParallel`: the network is called once per edited module inside
a trajectory of edits, not as one forward pass, and its gradient reaches it
through a backward call of our own (the meta-gradient), which DDP's reducer
would have to be told to wait for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Which process this is (`rank`) among how many (`size`)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints and reports."""
        return self.rank == 0

    @classmethod
    def current(cls) -> Ranks:
        """This process's place in the process group, or the only one without a group."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str) -> tuple[Ranks, str]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this
    process's ranks and device: `cuda:LOCAL_RANK` when `device` is CUDA; on the
    CPU, the machine's cores shared out among its processes."""
    if not launched_by_torchrun():
        return Ranks(), device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # The processes on one machine share its cores rather than each taking all.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks.current(), device


def launch(nproc: int, function: Callable[..., Any], *args: Any) -> list[Any]:
    """Run `function(*args)` in `nproc` new processes on this machine, as torchrun's
    `--standalone` would, and return what each returned, in rank order."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"lledit-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
    )
    returned = elastic_launch(config, function)(*args)
    return [returned[rank] for rank in range(nproc)]


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gathered(value: Any, ranks: Ranks) -> list[Any]:
    """`value` from every process, in rank order (picklable; tensors on the CPU)."""
    if ranks.size == 1:
        return [value]
    values: list[Any] = [None] * ranks.size
    dist.all_gather_object(values, value)
    return values


def average_gradients(parameters: Iterable[torch.nn.Parameter], count: int, ranks: Ranks) -> None:
    """Sum each parameter's gradient over the processes and divide by `count`,
    the trajectories they add up over. A parameter no process gave a gradient
    keeps none, as the optimizer then leaves it alone."""
    parameters = list(parameters)
    if ranks.size > 1:
        present = torch.tensor(
            [float(p.grad is not None) for p in parameters], device=parameters[0].device
        )
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in parameters
            ]
        )
        dist.all_reduce(present)
        dist.all_reduce(flat)
        for parameter, chunk, given in zip(
            parameters, flat.split([p.numel() for p in parameters]), present.tolist(), strict=True
        ):
            parameter.grad = chunk.view_as(parameter).clone() if given else None
    if count != 1:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.div_(count)


def barrier(ranks: Ranks) -> None:
    """Wait for every process (nothing to wait for alone)."""
    if ranks.size > 1:
        dist.barrier()
