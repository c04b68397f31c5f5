"""The training loop every stage shares.

A stage says three things: which tensors it trains (`trainable_parameters`), how a batch becomes
the hidden states that feed the head (`hidden_states`), and how the head is applied
(`head_logits`). Everything else — AdamW over exactly those tensors, warmup + cosine, the masked
cross-entropy, validation metrics, the non-finite guard, the caching pass — lives here once.

Batches are dicts (see stackwise/data/stage_data.py and stackwise/data/activations.py):
  ids or hidden  (B, T) long masked input ids  |  (B, T, D) hidden states of the previous layer
  targets (B, T) long, mask (B, T) bool, t (B,) float, index (B,) long, view (B,) long
"""

from __future__ import annotations

import abc
import math

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from stackwise.config import OptimConfig
from stackwise.errors import StackWiseError
from stackwise.model.config import ModelConfig
from stackwise.objective.loss import LossOut, masked_loss
from stackwise.utils import derive_seed


class NonFiniteLossError(StackWiseError):
    """Training produced a NaN/inf loss: the stage stops and nothing of it is kept."""


class StageModule(L.LightningModule, abc.ABC):
    stage_name: str = "stage"

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, weighting: str, max_steps: int):
        super().__init__()
        self.cfg, self.optim, self.weighting, self.max_steps_total = cfg, optim, weighting, max_steps
        # summed over the validation set (and over ranks under DDP), then divided once
        self.val_ce, self.val_masked, self.val_correct = SumMetric(), SumMetric(), SumMetric()

    # ------------------------------------------------------------------ what a stage defines
    @abc.abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the tensors this stage trains (invariant 1: nothing else may change)."""

    @abc.abstractmethod
    def hidden_states(self, batch: dict) -> Tensor:
        """(B, T, D) hidden states after the stage's last layer."""

    @abc.abstractmethod
    def head_logits(self, h: Tensor) -> Tensor:
        """(N, D) hidden states at supervised positions -> (N, V) logits."""

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by torch's DistributedDataParallel when it wraps this module. Every buffer of a stage
        # is a constant each rank builds identically (the frozen tensors, regenerated from (seed, k);
        # a later stage's copy of the tied embedding, read from layer_1.pt), so DDP's default of
        # broadcasting all buffers from rank 0 before every forward would only move bytes: about
        # 1 GB a step for the frozen up-projection of one 70B-sized layer.
        return [name for name, _ in self.named_buffers()]

    # ------------------------------------------------------------------ shared loop
    def pad_mask(self, batch: dict) -> Tensor | None:
        pad = batch["targets"] == self.cfg.pad_id  # (B, T)
        # None lets attention use its fused kernels when a batch has no padding at all
        return pad if bool(pad.any()) else None

    def compute_loss(self, batch: dict) -> LossOut:
        h = self.hidden_states(batch)  # (B, T, D)
        return masked_loss(
            h,
            batch["targets"],
            batch["mask"],
            batch["t"],
            self.head_logits,
            weighting=self.weighting,
            pad_id=self.cfg.pad_id,
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
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"stage {self.stage_name}: non-finite training loss ({out.loss.item()}) at step "
                f"{self.global_step}; nothing of this stage is saved or cached (lower optim.lr?)"
            )
        bsz = batch["targets"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bsz)
        self.log("train/masked_acc", out.n_correct / out.n_masked.clamp_min(1), batch_size=bsz)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.compute_loss_mean(batch)
        self.val_ce.update(out.ce_sum)
        self.val_masked.update(out.n_masked)
        self.val_correct.update(out.n_correct)

    def compute_loss_mean(self, batch: dict) -> LossOut:
        """Validation always reports the mean masked CE, comparable across weightings."""
        h = self.hidden_states(batch)
        return masked_loss(
            h, batch["targets"], batch["mask"], batch["t"], self.head_logits, weighting="mean", pad_id=self.cfg.pad_id
        )

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

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """One batch of the activation cache: the hidden state after this stage's layer."""
        return {
            "hidden": self.hidden_states(batch),
            "targets": batch["targets"],
            "mask": batch["mask"],
            "t": batch["t"],
            "index": batch["index"],
            "view": batch["view"],
        }

    def configure_optimizers(self):
        params = self.trainable_parameters()
        # decay matrices, not norms (Llama / nanoGPT practice)
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(self.optim.warmup_steps, self.max_steps_total, self.optim.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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
