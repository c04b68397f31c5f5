"""`hardware=fsdp`: a stage's fit sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per block.

Why FSDP2 through Lightning's `ModelParallelStrategy` and not Lightning's `strategy: fsdp` (FSDP1):
a stage trains a block whose SwiGLU up-projection is frozen next to parameters that train, which
FSDP1's flat parameters only take with `use_orig_params`; FSDP1 refuses norm gradient clipping in
Lightning (`FSDPPrecision`); and FSDP2 keeps every module and parameter name, so the gathered
state dict is exactly the one a single-GPU run writes. It needs torch >= 2.4.

What is sharded (`shard_stage`): each block the stage runs (`StageModule.blocks()`) is its own unit,
gathered just before its forward and freed after it (and again in backward); everything else (the
embedding, the final norm, the head, tied or not) is the root unit, gathered for a whole step. The
stage's step methods are registered as FSDP forward methods, because Lightning calls
`training_step` / `validation_step` / `predict_step` and never the module's `forward`.

Only `fit` runs sharded, and on a copy (`fit_copy`): the module the pipeline built stays whole on
the CPU, and after the fit `load_trained` gathers the trained weights back into it on every rank
(one tensor at a time, to the CPU). Scoring, saving and caching then run that plain module as
every other run does (under DDP when there are several ranks: `plain_strategy`). A stage therefore still has to fit one GPU for scoring and
caching, which it does up to very large sizes; FSDP is for the optimizer state of e2e, the joint
fine-tune and untied heads of large models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from stackwise.stages.base import StageModule

STEP_METHODS = ("training_step", "validation_step", "predict_step")


def strategy(**kwargs: Any):
    """The `hardware=fsdp` strategy (conf/hardware/fsdp.yaml): data parallel over every rank, no
    tensor parallelism, and checkpoints gathered into one full file on rank 0 (CPU), written by the
    run's checkpoint IO like any other (not a distributed checkpoint folder)."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # lightning < 2.4
        from stackwise.errors import ConfigError

        raise ConfigError("hardware", "fsdp needs lightning >= 2.4 (ModelParallelStrategy)") from None

    class ShardedDataParallel(ModelParallelStrategy):
        def setup_environment(self) -> None:
            # "auto" would mean one data-parallel group per node; every rank shards the stage here
            self._data_parallel_size = self.world_size
            super().setup_environment()

    kwargs.setdefault("tensor_parallel_size", 1)
    kwargs.setdefault("save_distributed_checkpoint", False)
    return ShardedDataParallel(**kwargs)


def is_sharded_strategy(strategy_obj: Any) -> bool:
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:
        return False
    return isinstance(strategy_obj, ModelParallelStrategy)


def is_sharded_node(node: Any) -> bool:
    """Whether a `trainer.strategy` setting is the one `strategy()` builds."""
    return isinstance(node, dict) and str(node.get("_target_", "")).endswith("sharding.strategy")


def plain_strategy(node: Any) -> Any:
    """The strategy scoring and caching run under: DDP in place of the sharded one (see the module docstring)."""
    return "ddp" if is_sharded_node(node) else node


def _fsdp():
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError:  # torch 2.4 / 2.5 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard, register_fsdp_forward_method
    return fully_shard, register_fsdp_forward_method


def shard_stage(module: StageModule, mesh) -> None:
    """Shard `module` in place over `mesh`: one unit per block, the rest in the root unit."""
    fully_shard, register_forward = _fsdp()
    own = {id(m) for m in module.modules()}
    for block in module.blocks():
        if id(block) in own:  # not a recomputed stage's frozen prefix: every rank runs it whole
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in STEP_METHODS:
        register_forward(module, name)


def is_sharded(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter and persistent buffer of a sharded `module`, whole, on the CPU of every rank.
    Every rank must call it (each sharded parameter is an all-gather), in the same order."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Tensor] = {}
    state = module.state_dict(keep_vars=True)
    for name, t in state.items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = whole.detach().to("cpu", copy=True)
    return out


def fit_copy(module: StageModule) -> StageModule:
    """What a sharded fit trains in place of `module`: the same stage rebuilt around fresh modules
    (`StageModule.rebuild`) holding `module`'s weights. `module` itself stays whole, on the CPU."""
    copy = module.rebuild()
    copy.load_state_dict(module.state_dict())
    copy.step_config = module.step_config
    copy.flops_per_batch = getattr(module, "flops_per_batch", None)
    return copy


def load_trained(module: StageModule, trained: StageModule) -> None:
    """Into `module`, the full weights of `trained` after its sharded fit (every rank calls it)."""
    module.load_state_dict(full_state(trained))
