"""FSDP2 on several CPU processes (gloo, `use_cpu=True` under `torchrun`), which Accelerate would run as DDP.

Accelerate enables FSDP only for accelerator devices (`AcceleratorState` switches to FSDP from GPU-like distributed
types, not from `MULTI_CPU`), so `fsdp`/`fsdp_config` (or `ACCELERATE_USE_FSDP=true`) with `use_cpu=True` under
`torchrun` would silently train with DDP. PyTorch's FSDP2 (`fully_shard`) runs on a CPU device mesh over gloo.
"""

from __future__ import annotations

import os
from typing import Any


def _requested_cpu_fsdp_plugin(distributed_type: Any, fsdp_plugin_args: dict | None) -> Any:
    """The FSDP plugin asked for when Accelerate left several CPU processes on DDP (`MULTI_CPU`), else `None`."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if distributed_type != DistributedType.MULTI_CPU:
        return None
    if fsdp_plugin_args is not None:
        plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_args)
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets
    else:
        return None
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version={plugin.fsdp_version} on CPU processes: only FSDP2 (fully_shard) runs on CPUs here; set "
            "fsdp_config={'version': 2} (or fsdp_version: 2 in the accelerate config), or train on GPUs."
        )
    return plugin


def _switch_state_to_fsdp(state: Any, plugin: Any) -> None:
    """Switch Accelerate's (shared) state to FSDP with `plugin`, the way `AcceleratorState` does it on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
