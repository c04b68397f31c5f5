"""The training loop every stage shares.

A stage says four things: which tensors it trains (`trainable_parameters`), how a batch becomes
the hidden states that feed the head (`hidden_states`), which blocks it runs (`blocks`, what
`step.compile` compiles) and what its head is (`linear_head`). Everything else — AdamW over
exactly those tensors, warmup + cosine, the masked cross-entropy, validation metrics, the
non-finite guard, the caching pass — lives here once.

Batches are dicts (see stackwise/data/stage_data.py and stackwise/data/cache/reader.py):
  ids or hidden  (B, T) long masked input ids  |  (B, T, D) hidden states of the previous layer
  targets (B, T) long, mask (B, T) bool, t (B,) float, index (B,) long, view (B,) long
and, added on the host before the batch moves to the device (`prepare_batch`):
  has_pad  bool, whether any target is padding;  mask_index (N,) long, the masked positions in (B*T)

A training step never waits for the device (on CUDA, the host runs ahead and keeps the GPU fed):
the padding flag and the masked rows' positions are known on the host, the gather of those rows
has a shape the host knows, the non-finite guard keeps its flag on the device and reads it every
`trainer.log_every_n_steps` steps, before every checkpoint and at the end of training, and the
progress bar and throughput monitor (stages/callbacks.py) read the device at that cadence too.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn
from torchmetrics import SumMetric

from stackwise.config import OptimConfig, StepConfig
from stackwise.errors import ConfigError, StackWiseError
from stackwise.model.config import ModelConfig
from stackwise.objective.loss import LinearHead, LossOut, chunk_rows_for, masked_loss, masked_positions
from stackwise.stages import sharding
from stackwise.utils import derive_seed


class NonFiniteLossError(StackWiseError):
    """Training produced a NaN/inf loss: the stage stops and nothing of it is kept."""


class StageModule(L.LightningModule, abc.ABC):
    stage_name: str = "stage"

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, weighting: str, max_steps: int):
        super().__init__()
        self.cfg, self.optim, self.weighting, self.max_steps_total = cfg, optim, weighting, max_steps
        # how the step runs (compile, fused AdamW, loss chunks): the pipeline gives it the run's `step` node
        self.step_config = StepConfig()
        # summed over the validation set (and over ranks under DDP), then divided once
        self.val_ce, self.val_masked, self.val_correct = _sum_metric(), _sum_metric(), _sum_metric()
        # the first step whose training loss was not finite (-1: none) and that loss, kept on the device
        self._bad_step: Tensor | None = None
        self._bad_loss: Tensor | None = None
        self._checked_at = -1
        # the head's cross-entropy through its compiled kernel (objective/loss.py): set with compile_blocks
        self.fused_loss = False

    # ------------------------------------------------------------------ what a stage defines
    @abc.abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the tensors this stage trains (invariant 1: nothing else may change)."""

    @abc.abstractmethod
    def hidden_states(self, batch: dict) -> Tensor:
        """(B, T, D) hidden states after the stage's last layer."""

    @abc.abstractmethod
    def linear_head(self) -> LinearHead:
        """The head as (final norm, W (V, D)): logits of (N, D) hidden states = F.linear(norm(h), W)."""

    @abc.abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks the stage runs (what `step.compile` compiles)."""

    @abc.abstractmethod
    def rebuild(self) -> StageModule:
        """The same stage around fresh, unsharded modules (stackwise/stages/sharding.py `gather`
        loads the full weights into it after a sharded fit)."""

    def head_logits(self, h: Tensor) -> Tensor:
        """(N, D) hidden states at supervised positions -> (N, V) logits."""
        return self.linear_head().logits(h)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by torch's DistributedDataParallel when it wraps this module. Every buffer of a stage
        # is a constant each rank builds identically (the frozen tensors, regenerated from (seed, k);
        # a later stage's copy of the tied embedding, read from layer_1.pt), so DDP's default of
        # broadcasting all buffers from rank 0 before every forward would only move bytes: about
        # 1 GB a step for the frozen up-projection of one 70B-sized layer.
        return [name for name, _ in self.named_buffers()]

    # ------------------------------------------------------------------ the batch, on the host
    def prepare_batch(self, batch: dict) -> dict:
        """The batch with `has_pad` and `mask_index` (see the module docstring), computed where the
        batch is, on the host: on the device each would make the host wait for the GPU. A batch that
        already has them (from its loader) keeps them; one already on an accelerator is left as is."""
        if not isinstance(batch, dict) or "targets" not in batch or batch["targets"].device.type != "cpu":
            return batch
        out = dict(batch)
        if "has_pad" not in out:
            out["has_pad"] = bool((batch["targets"] == self.cfg.pad_id).any())
        if "mask_index" not in out:
            index = masked_positions(batch["mask"])  # (N,)
            out["mask_index"] = index.pin_memory() if batch["mask"].is_pinned() else index
        return out

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.prepare_batch(batch)

    # ------------------------------------------------------------------ shared loop
    def pad_mask(self, batch: dict) -> Tensor | None:
        pad = batch["targets"] == self.cfg.pad_id  # (B, T)
        has_pad = batch.get("has_pad")
        if has_pad is None:  # a batch that did not pass prepare_batch: ask the device
            has_pad = bool(pad.any())
        # None lets attention use its fused kernels when a batch has no padding at all
        return pad if has_pad else None

    def compute_loss(self, batch: dict, weighting: str | None = None) -> LossOut:
        h = self.hidden_states(batch)  # (B, T, D)
        return masked_loss(
            h,
            batch["targets"],
            batch["mask"],
            batch["t"],
            self.linear_head(),
            weighting=weighting or self.weighting,
            pad_id=self.cfg.pad_id,
            index=batch.get("mask_index"),
            chunk_rows=chunk_rows_for(self.step_config.loss_chunk, self.cfg.vocab_size),
            fused=self.fused_loss,
        )

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Dropout draws from the global RNG, which every DataLoader iterator also draws from (its base
        # seed), and a resumed stage builds its iterators at other times than one that never stopped.
        # Seeding it per (seed, stage, step, micro-batch, rank) makes step s's dropout the same either way.
        if self.cfg.dropout > 0:
            micro = batch_idx % max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
            torch.manual_seed(
                derive_seed(self.cfg.seed, "dropout", self.stage_name, self.global_step, micro, self.global_rank)
            )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.compute_loss(batch)
        self._watch_finite(out.loss)
        bsz = batch["targets"].shape[0]
        # Only on the steps Lightning writes to the logger: each self.log costs about a millisecond of
        # host time (Lightning moves its result record to the value's device), which at small batches
        # is more than the GPU's step. Not prog_bar either: Lightning turns progress-bar values into
        # Python numbers after every batch (an .item(), a GPU wait); StepProgressBar reads the loss
        # from callback_metrics at the same cadence.
        if self._logs_this_step():
            self.log("train/loss", out.loss, batch_size=bsz)
            self.log("train/masked_acc", out.n_correct / out.n_masked.clamp_min(1), batch_size=bsz)
        return self._global_mean(out)

    def _logs_this_step(self) -> bool:
        """Whether this optimizer step's values reach the logger: every `log_every_n_steps`-th step
        (Lightning's own test, on the steps done plus this one) and the stage's last step."""
        trainer = self._trainer
        if trainer is None:
            return True
        step, every = self.global_step + 1, int(trainer.log_every_n_steps)
        return (every > 0 and step % every == 0) or step == trainer.max_steps

    def _global_mean(self, out: LossOut) -> Tensor:
        """The loss whose gradient, averaged over the ranks by DDP / FSDP, is the gradient of the mean
        over every masked position of the global batch, as on one process. Each rank's own mean would
        give a mean of the ranks' means, which differs whenever their batches mask different counts.
        One all-reduce of a scalar, queued on the device like the gradients' (no host wait)."""
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1 or self.weighting != "mean":  # elbo divides by the token count, the same on every rank
            return out.loss
        n_local = out.n_masked.detach().float().clamp_min(1)
        n_global = trainer.strategy.reduce(n_local.clone(), reduce_op="sum")
        return out.loss * (n_local * world / n_global)

    # ------------------------------------------------------------------ the non-finite guard
    def _watch_finite(self, loss: Tensor) -> None:
        """Remember the first non-finite loss and its step, on the device (no sync)."""
        loss = loss.detach().float()
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = self._bad_step.masked_fill(first, self.global_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a training loss since the stage started was NaN or inf (one sync)."""
        if self._bad_step is None:
            return
        step = int(self._bad_step)
        # every rank checks at the same steps; all of them stop together, or the others would wait
        # for this one in their next collective
        trainer = self._trainer
        anywhere = trainer.strategy.reduce_boolean_decision(step >= 0, all=False) if trainer is not None else step >= 0
        if step >= 0:
            raise NonFiniteLossError(
                f"stage {self.stage_name}: non-finite training loss ({float(self._bad_loss)}) at step "
                f"{step}; nothing of this stage is saved or cached (lower optim.lr?)"
            )
        if anywhere:
            raise NonFiniteLossError(
                f"stage {self.stage_name}: non-finite training loss on another rank by step {self.global_step}; "
                "nothing of this stage is saved or cached (lower optim.lr?)"
            )

    def on_train_start(self) -> None:
        self._bad_step = self._bad_loss = None
        self._checked_at = -1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # at the logging cadence: the stage stops a few steps after a non-finite loss, not at it
        step = self.global_step
        if step != self._checked_at and step % max(1, int(self.trainer.log_every_n_steps)) == 0:
            self._checked_at = step
            self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # no checkpoint holds the weights a non-finite loss left

    def on_train_end(self) -> None:
        self.check_finite()  # nor does a finished stage

    # ------------------------------------------------------------------ validation and caching
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.compute_loss_mean(batch)
        self.val_ce.update(out.ce_sum)
        self.val_masked.update(out.n_masked)
        self.val_correct.update(out.n_correct)

    def compute_loss_mean(self, batch: dict) -> LossOut:
        """Validation always reports the mean masked CE, comparable across weightings."""
        return self.compute_loss(batch, weighting="mean")

    def on_validation_epoch_start(self) -> None:
        # A bf16-true / 16-true precision plugin casts the whole module to half precision, metric
        # states included: a sum over the validation set in bf16 keeps 3 significant digits, and a
        # count past 256 is no longer exact. The sums stay fp32 whatever dtype the model runs in.
        for m in (self.val_ce, self.val_masked, self.val_correct):
            m.set_dtype(torch.float32)

    def on_validation_epoch_end(self) -> None:
        ce, n, correct = self.val_ce.compute(), self.val_masked.compute(), self.val_correct.compute()
        n = n.clamp_min(1)
        self.log("val/loss", ce / n, prog_bar=True)
        self.log("val/masked_acc", correct / n)
        for m in (self.val_ce, self.val_masked, self.val_correct):
            m.reset()

    def cached_states(self, batch: dict) -> Tensor:
        """(B, T, D) what the activation cache holds: the hidden state after this stage's layer (a
        layer stage with a top segment caches its own layer's output, not the top segment's)."""
        return self.hidden_states(batch)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """One batch of the activation cache: the hidden state after this stage's layer."""
        return {
            "hidden": self.cached_states(batch),
            "targets": batch["targets"],
            "mask": batch["mask"],
            "t": batch["t"],
            "index": batch["index"],
            "view": batch["view"],
        }

    # ------------------------------------------------------------------ optimizer and compilation
    def configure_optimizers(self):
        params = self.trainable_parameters()
        # decay matrices, not norms (Llama / nanoGPT practice)
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        kernel = {"fused": True} if self._fused_adamw(params) else {}
        try:
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=self.optim.lr,
                betas=tuple(self.optim.betas),
                eps=self.optim.eps,
                **kernel,
            )
        except RuntimeError as e:  # step.fused_adamw=true where this torch has no fused kernel
            if not kernel:
                raise
            msg = str(e).splitlines()[0]
            raise ConfigError(
                "step.fused_adamw", f"true, but torch {torch.__version__} refuses it here ({msg})"
            ) from None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(self.optim.warmup_steps, self.max_steps_total, self.optim.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_adamw(self, params: list[nn.Parameter]) -> bool:
        setting = self.step_config.fused_adamw
        if setting != "auto":
            return bool(setting)
        # 16-mixed's gradient scaler and a fused AdamW together refuse gradient clipping in Lightning;
        # on CPU the default (foreach) kernel stays, so a CPU run's numbers do not change
        trainer = self._trainer
        scaler = trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None
        return bool(params) and all(p.is_cuda for p in params) and not scaler

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and _optimizer_handles_unscaling(optimizer):
            # Lightning's mixed-precision plugin refuses to clip for an optimizer that can unscale
            # gradients itself (a fused AdamW): under 16-mixed's scaler the gradients it would clip are
            # still scaled. bf16-mixed has no scaler, so they are the true ones: clip them as it would.
            algorithm = GradClipAlgorithmType((gradient_clip_algorithm or "norm").lower())
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_model(self) -> None:
        # Lightning calls this hook on every fit / validate / predict; only a sharded fit
        # (hardware=fsdp) acts on it, once: the module is sharded in place
        trainer = self._trainer
        if trainer is not None and sharding.is_sharded_strategy(trainer.strategy) and not sharding.is_sharded(self):
            sharding.shard_stage(self, self.device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        if self._compile():
            self.compile_blocks()

    def _compile(self) -> bool:
        # a sharded block (FSDP1's flat parameters, FSDP2's hooks) compiles only with settings not measured here
        strategy = self.trainer.strategy
        sharded = isinstance(strategy, FSDPStrategy) or sharding.is_sharded_strategy(strategy)
        on_cuda = self.device.type == "cuda" and hasattr(nn.Module, "compile")
        return self.step_config.compiles(on_cuda, sharded, self.trainer.max_steps)

    def compile_blocks(self) -> None:
        """torch.compile each block's forward, in place (nn.Module.compile): the modules, and so
        every state dict and checkpoint, keep their names; compilation happens at the first call.
        The head's chunked cross-entropy then runs its compiled kernel too (`fused_loss`)."""
        if not hasattr(nn.Module, "compile"):
            raise ConfigError(
                "step.compile", f"true needs torch >= 2.2 (nn.Module.compile), this is {torch.__version__}"
            )
        for block in self.blocks():
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile()
        self.fused_loss = True


def _sum_metric() -> SumMetric:
    """A sum that keeps a NaN (the loss it reports is then NaN, as it is) instead of torchmetrics'
    default of warning and dropping it, which also asks the GPU whether there is one: a host wait
    per update. `nan_strategy="disable"` is newer than the torchmetrics>=1.0 the package accepts."""
    try:
        return SumMetric(nan_strategy="disable")
    except ValueError:
        return SumMetric()


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """lr multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    """The tensors an optimizer may touch: the model's frozen ones (SwiGLU up, MLA ups) never are."""
    return [p for m in modules for p in m.parameters() if p.requires_grad]
