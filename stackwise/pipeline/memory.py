"""Where the fused model goes, and whether it fits there (and where a layer stage's modules are built).

Writing `fused/` never needs the model: it streams from the layer files (stackwise/model/weights.py
`fused_tensors`), or, where the check built the model anyway, from that model the same bytes
(`assembled_tensors`, nothing read or drawn again). Two things need it: the fusion check (the fused
model scored on the validation set) and the joint fine-tune. The model is built where the run's Trainer puts it (straight on the GPU of
a one-GPU run, so the host never holds it; on the host otherwise, as Lightning expects), and both are
judged by a plain estimate against the free memory there:

- the check needs the fp32 weights (4 bytes a parameter, the frozen tensors included): when they do
  not fit, the check is skipped with a warning and the fused model records the last stage's scores;
- the fine-tune needs at least 16 bytes a trained parameter (fp32 weights, gradients and AdamW's
  two moments), activations aside: when that does not fit, the run stops before fusion writes
  anything, with one line naming the way that does fit (FSDP shards it across GPUs, which this
  estimate leaves to the strategy) or `fusion.finetune_steps=0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stackwise.config import RunConfig
from stackwise.errors import ConfigError
from stackwise.model.stats import param_counts

GIB = 2**30
SHARDED = ("fsdp", "deepspeed")  # strategies that shard the weights and optimizer state across devices


def _placement(node: dict) -> tuple[str, bool, int | None]:
    """(strategy, on CUDA, the one CUDA device index or None) of the Trainers a `trainer` node builds."""
    accelerator, strategy = str(node.get("accelerator", "auto")), str(node.get("strategy", "auto"))
    devices = node.get("devices", "auto")
    cuda = torch.cuda.is_available() and (accelerator in ("gpu", "cuda") or accelerator == "auto")
    if not cuda:
        return strategy, False, None
    if isinstance(devices, (list, tuple)) and len(devices) == 1:
        one = int(devices[0])
    elif devices in (1, "1") or (devices in ("auto", -1, "-1") and torch.cuda.device_count() == 1):
        one = 0
    else:
        one = None
    return strategy, True, one if strategy in ("auto", "single_device") else None


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (a CUDA device, or the host for "cpu"); None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class FusionRoom:
    """The fused model's size against the memory where it goes."""

    device: torch.device  # where the model is built
    bound: torch.device  # whose memory bounds it (the GPU of a GPU run, even one built on the host)
    free: int | None  # bytes free on `bound` (None: unknown, taken to fit)
    params: int
    trainable: int
    sharded: bool  # the fine-tune's strategy shards the model (FSDP, DeepSpeed)

    @property
    def check_bytes(self) -> int:
        return 4 * self.params

    @property
    def finetune_bytes(self) -> int:
        return self.check_bytes + 12 * self.trainable

    def fits_check(self) -> bool:
        return self.free is None or self.check_bytes <= self.free

    def why_not_check(self) -> str:
        weights, free = _size(self.check_bytes), _size(self.free)
        return f"the fused model's fp32 weights ({weights}) do not fit in the {free} free on {self.bound}"

    def refuse_finetune(self, steps: int) -> None:
        """Stop (one line) when the joint fine-tune of `steps` steps cannot fit (see the module doc)."""
        if steps <= 0 or self.free is None:
            return
        if not self.fits_check():  # not even the model itself: no strategy gets it off this device first
            raise ConfigError("fusion.finetune_steps", f"{steps}: {self.why_not_check()}; set fusion.finetune_steps=0")
        if self.sharded or self.finetune_bytes <= self.free:
            return
        raise ConfigError(
            "fusion.finetune_steps",
            f"{steps}: the joint fine-tune needs at least {_size(self.finetune_bytes)} on {self.bound} "
            f"(fp32 weights, gradients and AdamW state of {self.trainable / 1e9:.2f}B trained parameters) but "
            f"{_size(self.free)} is free; fine-tune it sharded across GPUs (hardware=fsdp) or set "
            f"fusion.finetune_steps=0",
        )


def _size(n: int | None) -> str:
    if n is None:
        return "? GiB"
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def fusion_room(run: RunConfig) -> FusionRoom:
    """Where the fused model goes and how much room there is (see the module doc)."""
    strategy, cuda, one = _placement(run.trainer)  # the fusion's validate and fit: the node's placement
    sharded = any(s in strategy.lower() for s in SHARDED)
    counts = param_counts(run.model)
    if cuda and one is not None:
        device = bound = torch.device("cuda", one)
        free = free_bytes(device)
    elif cuda and not sharded:  # several GPUs, each holding the whole model (DDP): built on the host
        device = torch.device("cpu")
        # asking CUDA before Lightning has started the ranks could break a forking launcher
        bound = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else device
        free = free_bytes(bound)
        host = free_bytes(device)
        if bound != device and host is not None:  # the host holds it first
            free = host if free is None else min(free, host)
    else:
        device = bound = torch.device("cpu")
        free = free_bytes(device)
    return FusionRoom(device, bound, free, counts["total"], counts["trainable"], sharded)


def one_gpu(node: dict) -> torch.device | None:
    """The CUDA device of a `trainer` node that places its Trainers on exactly one GPU, else None."""
    _, _, one = _placement(node)
    return None if one is None else torch.device("cuda", one)


def stage_device(run: RunConfig, budget: str) -> torch.device:
    """Where a layer stage's modules are built: straight on the GPU of a one-GPU stage (its trainable
    weights are drawn on the CPU a tensor at a time and copied there, its frozen ones drawn there:
    the values those of a CPU build), else on the host, where Lightning expects them under several
    devices."""
    _, _, one = _placement(run.trainer_kwargs(budget))
    return torch.device("cpu") if one is None else torch.device("cuda", one)
