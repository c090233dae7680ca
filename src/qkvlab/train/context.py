"""Where a process runs: its device, autocast dtype and place among ``torchrun`` processes.

:func:`setup_context` resolves a config's ``device`` and ``dtype`` and joins the process group
when launched by torchrun; tasks and the trainer take the :class:`RunContext` it returns.
:func:`wrap_model` and :func:`gradient_sync` are the model's side of it: DDP or FSDP2 under
torchrun, and no gradient all-reduce on the micro-steps of an accumulation but the last.

Example::

    ctx = setup_context(config)        # cpu, fp32, rank 0 of 1 on a laptop
    with ctx.autocast():
        loss = model(x)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from qkvlab.errors import ConfigError

if TYPE_CHECKING:
    from qkvlab.train.config import TrainConfig


@dataclass
class RunContext:
    """Where this process runs: its rank among ``world_size`` processes, device and autocast dtype."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when asked for (default on GPU), else nothing: fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all processes (a no-op in one process)."""
        if not self.distributed:
            return values
        values = values.to(self.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_context(config: TrainConfig) -> RunContext:
    """Resolve device and dtype; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.batch_size % world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} (the global micro-batch) does not divide over {world_size} "
            f"processes; use a multiple of {world_size}."
        )
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={config.device!r} but CUDA is not available; use device=cpu or device=auto.")
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={str(device)!r} but {torch.cuda.device_count()} CUDA device(s) are visible; use an index "
                f"below {torch.cuda.device_count()}, or device=auto."
            )
        torch.cuda.set_device(device)
    if config.dtype == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        amp_dtype = torch.bfloat16 if config.dtype == "bf16" else None
    owns = False
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        owns = True
    if world_size > 1:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return RunContext(device=device, amp_dtype=amp_dtype, rank=rank, world_size=world_size, owns_process_group=owns)


def wrap_model(model: nn.Module, config: TrainConfig, ctx: RunContext) -> nn.Module:
    """DDP or FSDP2 under torchrun; the model as is in one process.

    FSDP2 shards each element of every ``nn.ModuleList`` (the repeated blocks) as one unit,
    then the remaining parameters (embeddings, final norm, head) as the root unit.
    """
    if not ctx.distributed:
        return model
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-steps that are not the last of an accumulation."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
