"""The training step (stackwise/stages/base.py, stackwise/objective/loss.py, stackwise/stages/callbacks.py):
the same numbers by the sync-free paths, chunked head + cross-entropy, fused AdamW, torch.compile,
the non-finite guard's cadence, the throughput monitor's and the progress bar's device reads, and
checkpoints written in the background.

On CPU "no host-device sync" can only be shown indirectly: the host-side index path gives the same
loss and gradients as the boolean-mask path, and the monitor / bar / guard read the device only at
their cadence. The CUDA test at the end runs a whole step under torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import math
import os
import shutil
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch import nn

from stackwise import artifacts as art
from stackwise.compat import RMSNorm
from stackwise.config import OptimConfig, StepConfig
from stackwise.errors import ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Head
from stackwise.model.weights import LayerModules, LayerWeights, first_layer
from stackwise.objective import loss as loss_module
from stackwise.objective.loss import LinearHead, chunk_rows_for, masked_loss, masked_positions
from stackwise.pipeline.stage import Stage
from stackwise.pipeline.trainers import Trainers
from stackwise.stages.base import NonFiniteLossError
from stackwise.stages.callbacks import (
    AtomicCheckpointIO,
    StageCheckpoint,
    StepProgressBar,
    async_checkpoint_io,
    token_throughput_monitor,
)
from stackwise.stages.layerwise import LayerwiseStage

B, T, D, V, PAD, MASK = 4, 16, 32, 64, 0, 1


def batch_for(seed: int = 0, pad: bool = True) -> dict:
    """A token batch as the data modules give it: t per row, that fraction masked, padding at the end of row 0."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(2, V, (B, T), generator=g)
    if pad:
        targets[0, -5:] = PAD
    t = 0.15 + 0.75 * torch.rand(B, generator=g)
    mask = (torch.rand(B, T, generator=g) < t[:, None]) & (targets != PAD)
    mask[:, 1] = True
    ids = torch.where(mask, torch.full_like(targets, MASK), targets)
    return {"ids": ids, "targets": targets, "mask": mask, "t": t, "index": torch.arange(B), "view": torch.zeros(B)}


def head_pair(seed: int = 0) -> tuple[RMSNorm, nn.Parameter]:
    torch.manual_seed(seed)
    norm = RMSNorm(D, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm, nn.Parameter(torch.randn(V, D) * 0.3)


def loss_and_grads(hidden, batch, head, weighting, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    out = masked_loss(hidden, batch["targets"], batch["mask"], batch["t"], head, weighting, pad_id=PAD, **kw)
    params = [hidden] + [p for p in (head.weight, *head.features.parameters()) if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return out, grads


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("weighting", ["mean", "elbo"])
@pytest.mark.parametrize("pad", [True, False])
def test_host_index_gather_gives_the_boolean_mask_numbers_bit_for_bit(weighting, pad):
    batch = batch_for(pad=pad)
    hidden = torch.randn(B, T, D)
    head = LinearHead(*head_pair())
    index = masked_positions(batch["mask"])
    assert torch.equal(index, batch["mask"].reshape(-1).nonzero().squeeze(1))
    ref, ref_grads = loss_and_grads(hidden, batch, head, weighting)
    got, got_grads = loss_and_grads(hidden, batch, head, weighting, index=index)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_grads, got_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weighting", ["mean", "elbo"])
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_head_and_cross_entropy_equal_the_full_grid(weighting, chunk):
    batch = batch_for()
    hidden = torch.randn(B, T, D)
    head = LinearHead(*head_pair())
    n = int(batch["mask"].sum())
    assert n > 2 * chunk  # several chunks, the last one short
    index = masked_positions(batch["mask"])
    ref, ref_grads = loss_and_grads(hidden, batch, head, weighting, index=index)
    got, got_grads = loss_and_grads(hidden, batch, head, weighting, index=index, chunk_rows=chunk)
    assert torch.equal(got.n_correct, ref.n_correct) and torch.equal(got.n_masked, ref.n_masked)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.ce_sum, ref.ce_sum, rtol=1e-6, atol=0)
    for a, b in zip(ref_grads, got_grads, strict=True):  # hidden (through the norm), W, the norm's weight
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # a frozen projection (a later stage's tied embedding): only the hidden states get a gradient
    frozen = LinearHead(head.features, head.weight.detach())
    ref, (ref_h, *_) = loss_and_grads(hidden, batch, frozen, weighting)
    got, (got_h, *_) = loss_and_grads(hidden, batch, frozen, weighting, chunk_rows=chunk)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-7)
    # without autograd (validation), the same values
    with torch.no_grad():
        plain = masked_loss(hidden, batch["targets"], batch["mask"], batch["t"], head, weighting, PAD, chunk_rows=chunk)
    torch.testing.assert_close(plain.loss, ref.loss, rtol=1e-6, atol=0)


def test_chunked_head_under_bf16_autocast_stays_close():
    batch = batch_for()
    hidden = torch.randn(B, T, D)
    head = LinearHead(*head_pair())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads(hidden, batch, head, "elbo")
        got, got_grads = loss_and_grads(hidden, batch, head, "elbo", chunk_rows=5)
    assert got.loss.dtype == torch.float32 and got_grads[1].dtype == torch.float32  # fp32 master weight's grad
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-3, atol=0)
    for a, b in zip(ref_grads, got_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-3)


# inductor compiles for the CPU with a C++ compiler; without one, only the kernel's math is checked
HAS_CXX = bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


@pytest.mark.parametrize(
    "compiled",
    [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler"))],
)
@pytest.mark.parametrize("weighting", ["mean", "elbo"])
@pytest.mark.parametrize("chunk", [7, 4096])  # several chunks; one chunk holding every row
def test_fused_chunk_kernel_gives_the_eager_loss_and_gradients(weighting, chunk, compiled, monkeypatch):
    """`fused=True` (what a compiled stage runs): the per-chunk kernel, compiled for real (inductor on
    the CPU) or its math run eagerly, gives the eager loop's loss, counts and gradients, in fp32 and
    under bf16 autocast, with a trained and with a frozen head matrix."""
    kernel = loss_module.fused_chunk_kernel() if compiled else loss_module._fused_chunk
    calls = []  # the kernel must be what ran, not the eager loop beside it
    monkeypatch.setattr(loss_module, "fused_chunk_kernel", lambda: lambda *a: (calls.append(1), kernel(*a))[1])
    batch = batch_for()
    hidden = torch.randn(B, T, D)
    head = LinearHead(*head_pair())
    frozen = LinearHead(head.features, head.weight.detach())
    index = masked_positions(batch["mask"])
    for h in (head, frozen):
        ref, ref_grads = loss_and_grads(hidden, batch, h, weighting, index=index, chunk_rows=chunk)
        got, got_grads = loss_and_grads(hidden, batch, h, weighting, index=index, chunk_rows=chunk, fused=True)
        assert torch.equal(got.n_correct, ref.n_correct) and torch.equal(got.n_masked, ref.n_masked)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(got.ce_sum, ref.ce_sum, rtol=1e-6, atol=0)
        for a, b in zip(ref_grads, got_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads(hidden, batch, head, weighting, chunk_rows=chunk)
        got, got_grads = loss_and_grads(hidden, batch, head, weighting, chunk_rows=chunk, fused=True)
    assert got_grads[1].dtype == torch.float32  # the fp32 master weight's gradient
    assert len(calls) == 3 * math.ceil(int(batch["mask"].sum()) / chunk)  # a call a chunk, 3 fused runs
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=0)
    for a, b in zip(ref_grads, got_grads, strict=True):  # bf16 gradients of the logits: rounding apart
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_a_frozen_tied_head_is_cast_once_under_autocast():
    """A later stage's frozen stage-1 matrix: under autocast the head gets one cached cast of it (the
    values autocast would give), a new one after the module moves, and the fp32 buffer without autocast."""
    cfg = tiny_cfg(vocab_size=V)
    stage = LayerwiseStage(
        cfg,
        LayerModules(Block(cfg, 2), Head(cfg)),
        OptimConfig(),
        "mean",
        4,
        "layer_2",
        embed_weight=torch.randn(cfg.vocab_size, cfg.d_model),
    )
    assert stage.linear_head().weight is stage.embed_weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w1, w2 = stage.linear_head().weight, stage.linear_head().weight
    assert w1.dtype == torch.bfloat16 and w1 is w2
    assert torch.equal(w1, stage.embed_weight.to(torch.bfloat16))
    stage.to(torch.float64)  # replaces the buffer: the cast made from the old one is dropped
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w3 = stage.linear_head().weight
    assert w3 is not w1 and torch.equal(w3, stage.embed_weight.to(torch.bfloat16))


def test_auto_chunks_only_large_vocabularies():
    assert chunk_rows_for("auto", 128_256) == 2092  # a Llama 3 vocabulary: ~1 GiB of fp32 logits a chunk
    assert chunk_rows_for("auto", 258) > 500_000  # the byte vocabulary of the CPU default: never chunked
    assert chunk_rows_for(0, 128_256) == 0 and chunk_rows_for(300, 258) == 300


# ------------------------------------------------------------------------------ the stage module
def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, mask_id=MASK, pad_id=PAD)
    return ModelConfig(**{**base, **kw})


def stage1(cfg: ModelConfig | None = None, **step) -> LayerwiseStage:
    cfg = cfg or tiny_cfg()
    module = LayerwiseStage(cfg, first_layer(cfg), OptimConfig(lr=1e-2, warmup_steps=0), "elbo", 10, "embed")
    module.step_config = StepConfig(**step)
    return module


@pytest.mark.parametrize("tied", [True, False])
def test_stage_step_on_a_prepared_batch_is_the_same_step(tied):
    module = stage1(tiny_cfg(tie_embeddings=tied))
    raw = batch_for()
    prepared = module.prepare_batch(raw)
    assert prepared["has_pad"] is True and module.prepare_batch(batch_for(pad=False))["has_pad"] is False
    assert torch.equal(prepared["mask_index"], masked_positions(raw["mask"]))
    assert module.prepare_batch(prepared)["mask_index"] is prepared["mask_index"]  # a loader's own stays
    results = []
    for batch in (raw, prepared):
        module.zero_grad()
        out = module.compute_loss(batch)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in module.trainable_parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_fused_adamw_only_on_cuda_without_a_gradient_scaler():
    module = stage1()
    opt = module.configure_optimizers()["optimizer"]
    assert not opt.defaults.get("fused")  # CPU: the default kernel, the CPU run's numbers unchanged
    on_cuda = [SimpleNamespace(is_cuda=True)]
    assert module._fused_adamw(on_cuda)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))  # 16-mixed
    assert not module._fused_adamw(on_cuda)
    module = stage1(fused_adamw=False)
    assert not module._fused_adamw(on_cuda)


def test_fused_adamw_clips_gradients_under_bf16_mixed(tmp_path, monkeypatch):
    """Lightning's bf16-mixed plugin refuses to clip for a fused optimizer (it could be unscaling a
    16-mixed scaler's gradients); with no scaler the stage clips as Lightning would."""
    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, v, **kw: (clipped.append(v), real(p, v, **kw))[1])
    module = stage1(fused_adamw=True)  # CPU: torch >= 2.4 has a fused AdamW there too
    fit(module, tmp_path, 3, precision="bf16-mixed", gradient_clip_val=0.5)
    assert module.trainer.optimizers[0].defaults["fused"] and clipped == [0.5] * 3


def test_step_options_are_checked(make_run):
    with pytest.raises(ConfigError, match=r"step\.compile: must be true, false or auto"):
        make_run("step.compile=sometimes")
    with pytest.raises(ConfigError, match=r"step\.loss_chunk: must be an integer >= 0"):
        make_run("step.loss_chunk=-1")
    run = make_run("step.compile=false", "step.loss_chunk=0")
    assert run.step == StepConfig(compile=False, loss_chunk=0)
    assert run.hashes() == make_run().hashes() and run.exp_dir.name == "exp"


def token_loader(n: int, seed: int = 0):
    batches = [batch_for(seed + i) for i in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def fit(module, tmp_path, steps: int, callbacks=(), **kw) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        default_root_dir=str(tmp_path),
        **kw,
    )
    trainer.fit(module, train_dataloaders=token_loader(steps))
    return trainer


def test_compiled_blocks_train_the_same_tensors_under_the_same_names(tmp_path):
    if not hasattr(nn.Module, "compile"):
        pytest.skip("nn.Module.compile needs torch >= 2.2")
    eager, compiled = stage1(compile=False), stage1(compile=True)
    fit(eager, tmp_path, 2)
    fit(compiled, tmp_path, 2)
    assert compiled.block._compiled_call_impl is not None and eager.block._compiled_call_impl is None
    assert compiled.fused_loss and not eager.fused_loss  # the head's cross-entropy through its compiled kernel
    want, got = LayerWeights.of(eager.trained_modules()), LayerWeights.of(compiled.trained_modules())
    for section in ("block", "head", "embed"):
        a, b = getattr(want, section), getattr(got, section)
        assert list(a) == list(b), section  # no `_orig_mod.` in any name
        for name in a:  # two AdamW steps amplify rounding differences of the tiniest gradients
            torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    # the same weights give the same loss and gradients
    compiled.load_state_dict(eager.state_dict())
    batch = eager.prepare_batch(batch_for(7))
    results = []
    for module in (eager, compiled):
        module.zero_grad()
        out = module.compute_loss(batch)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in module.trainable_parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ the non-finite guard
class Exploding(LayerwiseStage):
    """The training loss turns NaN from optimizer step `at` on."""

    at = 1

    def compute_loss(self, batch, weighting=None):
        out = super().compute_loss(batch, weighting)
        if self.training and self.global_step >= self.at:
            out = out._replace(loss=out.loss * float("nan"))
        return out


def exploding(at: int) -> Exploding:
    cfg = tiny_cfg()
    module = Exploding(cfg, first_layer(cfg), OptimConfig(warmup_steps=0), "mean", 10, "embed")
    module.at = at
    return module


def test_non_finite_loss_is_reported_at_the_logging_cadence(tmp_path):
    module = exploding(at=1)
    with pytest.raises(NonFiniteLossError, match=r"^stage embed: non-finite training loss \(nan\) at step 1;"):
        fit(module, tmp_path, 10, log_every_n_steps=4)
    assert module.trainer.global_step == 4  # found at the first check after it, not by a sync every step


def test_non_finite_loss_never_reaches_a_checkpoint_or_the_end_of_a_stage(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=3)
    module = exploding(at=1)
    with pytest.raises(NonFiniteLossError, match=r"at step 1;"):
        fit(module, tmp_path, 10, callbacks=[ckpt], log_every_n_steps=50)
    assert module.trainer.global_step == 3 and not list((tmp_path / "ckpt").glob("*"))  # refused at the save
    module = exploding(at=4)
    with pytest.raises(NonFiniteLossError, match=r"at step 4;"):
        fit(module, tmp_path, 5, log_every_n_steps=50)  # the last step's loss: caught at the end of fit


# ------------------------------------------------------------------------------ monitor, bar, checkpoints
class TokenBoring(BoringModel):
    flops_per_batch = 1000

    def training_step(self, batch, batch_idx):
        return super().training_step(batch["x"], batch_idx)


def boring_loader():
    return torch.utils.data.DataLoader(
        [{"x": torch.randn(2, 32), "targets": torch.zeros(2, 8)} for _ in range(64)], batch_size=None
    )


def test_throughput_monitor_reads_the_clock_once_per_logging_interval(tmp_path, monkeypatch):
    updates = []
    real = Throughput.update
    monkeypatch.setattr(Throughput, "update", lambda self, **kw: (updates.append(kw), real(self, **kw))[1])
    logged = []
    monitor = token_throughput_monitor(window_size=2)
    trainer = L.Trainer(
        max_steps=12,
        log_every_n_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[monitor],
        default_root_dir=str(tmp_path),
    )
    monkeypatch.setattr(trainer._logger_connector, "log_metrics", lambda m, step=None: logged.append(m))
    trainer.fit(TokenBoring(), train_dataloaders=boring_loader())
    # Lightning's own: one synchronize + clock reading per batch (12); here one per interval of 4 steps
    assert [u["batches"] for u in updates] == [4, 8, 12]
    assert [u["lengths"] for u in updates] == [64, 128, 192] and [u["flops"] for u in updates] == [4000] * 3
    rates = [m["train/device/items_per_sec"] for m in logged if "train/device/items_per_sec" in m]
    assert len(rates) == 2 and all(r > 0 for r in rates)  # over the intervals 4..8 and 8..12


def test_progress_bar_reads_the_logged_metrics_only_at_the_logging_cadence(tmp_path, monkeypatch):
    reads = []
    real = StepProgressBar.get_metrics
    monkeypatch.setattr(
        StepProgressBar, "get_metrics", lambda self, t, m: (reads.append(t.global_step), real(self, t, m))[1]
    )
    bar = StepProgressBar()
    trainer = L.Trainer(
        max_steps=12,
        log_every_n_steps=4,
        logger=False,
        callbacks=[bar],
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(BoringModel())
    assert reads[:3] == [4, 8, 12] and reads[3:] in ([], [12])  # (+ at the epoch's end); Lightning's: every step
    assert bar.train_progress_bar.n == 12 and "step 12/12" in str(bar.train_progress_bar)


class Started(L.Callback):
    yes = False

    def on_train_batch_start(self, *args) -> None:
        self.yes = True


def test_a_stage_reads_no_tensor_value_between_logging_steps(tmp_path, monkeypatch):
    """What makes the host wait for a GPU (an .item(), a bool() or float() of a tensor) is a call a CPU fit
    makes too, and is counted here: a real stage fitted by Lightning with the pipeline's bar and monitor
    reads tensor values only at the logging cadence. (Lightning turns progress-bar values into numbers
    after every batch: a training loss logged with prog_bar=True would be read at every step.) Left out:
    the host batch's own preparation (prepare_batch: host tensors on a GPU too) and the CPU AdamW's
    step counter (a GPU run's AdamW is fused)."""
    import traceback

    module = stage1(tiny_cfg())
    reads: list[tuple[int, str]] = []
    started = Started()  # reads before the first training batch (Lightning's and the loader's set-up) do not count
    trainer = L.Trainer(
        max_steps=12,
        log_every_n_steps=4,
        logger=L.pytorch.loggers.CSVLogger(str(tmp_path)),
        callbacks=[started, bar := StepProgressBar(), token_throughput_monitor(window_size=2)],
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )

    def counted(name: str):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frames = traceback.extract_stack()
            host = any("torch/optim/" in f.filename.replace("\\", "/") or f.name == "prepare_batch" for f in frames)
            if started.yes and not host:
                reads.append((trainer.global_step, name))
            return real(self, *args, **kwargs)

        return read

    loader = torch.utils.data.DataLoader([batch_for(i) for i in range(12)], batch_size=None)
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    trainer.fit(module, train_dataloaders=loader)
    steps = sorted({s for s, _ in reads})
    assert steps and set(steps) <= {4, 8, 12}, f"tensor values read after steps {steps}: {reads}"
    assert "train/loss=" in str(bar.train_progress_bar)  # the bar still shows the loss, read at its cadence


def test_a_stage_logs_its_training_values_only_on_the_steps_the_logger_writes(tmp_path, monkeypatch):
    """self.log costs host time each call (about a millisecond: more than a small GPU step), so a stage
    calls it on the steps Lightning hands to the logger (every log_every_n_steps-th) and on its last
    step (the bar's final value); the logger gets the same rows as if every step were logged."""
    import csv

    module = stage1(tiny_cfg())
    calls: list[int] = []
    real_log = L.LightningModule.log

    def log(self, name, *args, **kwargs):
        if name == "train/loss":
            calls.append(self.global_step)
        return real_log(self, name, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", log)
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = L.Trainer(
        max_steps=10,
        log_every_n_steps=4,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    loader = torch.utils.data.DataLoader([batch_for(i) for i in range(10)], batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    assert calls == [3, 7, 9]  # global_step before the step: the 4th, the 8th and the last
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [3, 7]  # Lightning's rows for a value logged at every step
    assert all(math.isfinite(float(r["train/loss"])) and float(r["train/masked_acc"]) >= 0 for r in rows)


def _fit_boring(tmp_path, max_steps: int, callbacks: list, plugins: list | None = None) -> None:
    """Lightning's BoringModel trained `max_steps` steps, no validation, no logger."""
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        plugins=plugins or [],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(BoringModel())


def test_background_checkpoints_hold_the_weights_of_their_step(tmp_path):
    """Written by a thread while training goes on, each file still holds the weights of its step
    (snapshot on the training thread), complete, and no temporary file is left behind."""
    seen = {}

    class Remember(L.Callback):
        def on_train_batch_end(self, trainer, module, *_):
            seen[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2, filename="{step}")
    _fit_boring(tmp_path, 6, [Remember(), ckpt], plugins=[async_checkpoint_io()])
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"], files
    for step in (2, 4, 6):
        state = torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=True)["state_dict"]
        assert all(torch.equal(state[k], seen[step][k]) for k in state)


def test_background_checkpoints_on_a_gpu_only(make_run, tmp_path):
    run = make_run()
    io = Trainers(run, art.ExperimentPaths(run.exp_dir))._checkpoint_io
    assert type(io({"accelerator": "cpu"})) is AtomicCheckpointIO  # the resume tests' exact checkpoints
    gpu = io({"accelerator": "gpu"})
    assert type(gpu) is AsyncCheckpointIO and type(gpu.checkpoint_io) is AtomicCheckpointIO
    run = make_run("step.async_checkpoints=true")
    assert (
        type(Trainers(run, art.ExperimentPaths(run.exp_dir))._checkpoint_io({"accelerator": "cpu"}))
        is AsyncCheckpointIO
    )


def test_mid_stage_checkpoints_by_training_time_on_a_gpu_by_steps_on_the_cpu(make_run, tmp_path):
    """step.checkpoint_minutes: auto = every CHECKPOINT_MINUTES of training on a GPU, every
    val_check_interval steps on the CPU; a number picks the minutes, 0 the steps."""
    run = make_run("trainer.val_check_interval=7")
    make = Trainers(run, art.ExperimentPaths(run.exp_dir))._checkpoint

    cpu = make(Stage.layer(1), {"accelerator": "cpu", "val_check_interval": 7})
    assert cpu._every_n_train_steps == 7 and cpu._train_time_interval is None
    gpu = make(Stage.layer(1), {"accelerator": "gpu", "val_check_interval": 7})
    assert gpu._every_n_train_steps == 0
    assert gpu._train_time_interval == timedelta(minutes=StepConfig.CHECKPOINT_MINUTES)
    run = make_run("step.checkpoint_minutes=0")
    steps = Trainers(run, art.ExperimentPaths(run.exp_dir))._checkpoint(Stage.layer(1), {"accelerator": "gpu"})
    assert steps._train_time_interval is None and steps._every_n_train_steps > 0
    with pytest.raises(ConfigError, match=r"step.checkpoint_minutes: must be a number of minutes >= 0"):
        make_run("step.checkpoint_minutes=-1")


def test_a_time_based_checkpoint_is_written_by_the_clock_never_at_the_last_step(tmp_path, monkeypatch):
    """A StageCheckpoint with a training-time interval saves when that much time has passed (the
    clock is stepped by 10 minutes a batch here), holds the weights of its step, and none is saved at
    the last step (the stage writes its own artifact then)."""
    now = [0.0]
    monkeypatch.setattr("lightning.pytorch.callbacks.model_checkpoint.time.monotonic", lambda: now[0])
    saved = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, module, *_):
            now[0] += 600.0  # before the checkpoint callback's own hook (callbacks run in order)

    class Spy(StageCheckpoint):
        def _save_last_checkpoint(self, trainer, monitor_candidates):
            saved.append(trainer.global_step)
            super()._save_last_checkpoint(trainer, monitor_candidates)

    ckpt = Spy(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, train_time_interval=timedelta(minutes=25))
    _fit_boring(tmp_path, 9, [Clock(), ckpt])
    assert saved == [3, 6], saved  # 30 and 60 minutes in; step 9 (90) is the last: nothing then
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6


# ------------------------------------------------------------------------------ CUDA only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
def test_a_cuda_training_step_never_waits_for_the_gpu():
    device = torch.device("cuda")
    module = stage1(tiny_cfg(vocab_size=256), loss_chunk=16).to(device)
    opt = torch.optim.AdamW(
        module.trainable_parameters(),
        lr=1e-3,
        **({"fused": True} if module._fused_adamw(module.trainable_parameters()) else {}),
    )
    assert opt.defaults.get("fused")
    batches = [module.prepare_batch({k: v.pin_memory() for k, v in batch_for(i).items()}) for i in range(2)]

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module.compute_loss(batch)
        module._watch_finite(out.loss)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # lazy initialisations (cuBLAS handles, ...) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(batches[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    module.check_finite()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
def test_a_cuda_fit_waits_for_the_gpu_only_at_the_logging_cadence(tmp_path):
    """A real stage fitted by Lightning on the GPU, with the pipeline's bar and monitor: every training
    batch that is not a logging step runs, from its start to the next batch's, under
    torch.cuda.set_sync_debug_mode("error") (Lightning's loop, the batch's copy, the step, the hooks)."""
    device, every, steps = torch.device("cuda"), 4, 12

    class SyncFree(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            step = trainer.global_step + 1  # the optimizer step this batch makes
            quiet = step > 1 and step % every != 0 and step != steps  # the first: lazy initialisations
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

        def on_train_end(self, *args) -> None:
            torch.cuda.set_sync_debug_mode("default")

    module = stage1(tiny_cfg(vocab_size=256), loss_chunk=16)
    batches = [module.prepare_batch(batch_for(i)) for i in range(steps)]
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        log_every_n_steps=every,
        logger=L.pytorch.loggers.CSVLogger(str(tmp_path)),
        callbacks=[SyncFree(), StepProgressBar(), token_throughput_monitor(window_size=2)],
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=str(tmp_path),
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=True)
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == steps and device.type == "cuda"


@pytest.mark.skipif(not hasattr(nn.Module, "compile"), reason="nn.Module.compile: torch >= 2.2")
def test_a_compiled_block_compiles_once_and_computes_what_the_eager_one_does():
    """RoPE's cos/sin cache is filled outside the compiled graph (filled inside, it was a side effect the
    graph guarded on, and every block compiled a second time on its second call). Counted with a
    backend that runs the captured graph as it is."""
    from stackwise.model.transformer import Block

    cfg = tiny_cfg()
    compiled, eager = Block(cfg, 1), Block(cfg, 1)
    eager.load_state_dict(compiled.state_dict())
    graphs = []
    compiled.compile(backend=lambda gm, inputs: (graphs.append(gm), gm.forward)[1])
    for seed in range(3):
        x = torch.randn(2, 16, cfg.d_model, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
    assert len(graphs) == 1


def test_compile_auto_pays_back_only_on_long_stages_on_cuda():
    """auto compiles a stage's blocks on CUDA, unsharded, for >= COMPILE_MIN_STEPS steps; true and
    false are what they say."""
    auto, n = StepConfig(), StepConfig.COMPILE_MIN_STEPS
    assert auto.compiles(on_cuda=True, sharded=False, steps=n)
    assert not auto.compiles(on_cuda=True, sharded=False, steps=n - 1)
    assert not auto.compiles(on_cuda=False, sharded=False, steps=10 * n)
    assert not auto.compiles(on_cuda=True, sharded=True, steps=10 * n)
    assert StepConfig(compile=True).compiles(on_cuda=False, sharded=False, steps=1)
    assert not StepConfig(compile=False).compiles(on_cuda=True, sharded=False, steps=10 * n)


def test_keep_on_device_leaves_the_module_and_releases_what_training_needs(tmp_path):
    """The one-GPU strategy's teardown (run here on the CPU device): the module's tensors stay the same
    objects where they were, the optimizer and schedulers are released, no gradient is left."""
    from stackwise.stages.callbacks import KeepOnDevice

    model = BoringModel()
    params = list(model.parameters())
    trainer = L.Trainer(
        strategy=KeepOnDevice(device="cpu"),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    moved = []
    model.cpu = lambda: moved.append(True) or model  # Lightning's own teardown calls this
    trainer.fit(model)
    assert not moved and all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert trainer.strategy.optimizers == [] and trainer.strategy.lr_scheduler_configs == []
