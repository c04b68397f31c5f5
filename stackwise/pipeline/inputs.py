"""What a stage reads: masked token batches (layer 1, fusion, e2e, and layer 1's caching pass), the
activation cache of the layer below (layer k >= 2), or the token rows that cache would hold, for a
stage that recomputes its input (`cache.store=recompute`); the caching pass's loaders once the cache
is known to fit; and where the caches live (`resolve_store`, `cache.store=auto`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from stackwise import artifacts as art
from stackwise.config import RunConfig
from stackwise.config.nodes import precision_weights
from stackwise.data.cache.datamodule import ActivationDataModule, RecomputedDataModule, RowsDataModule
from stackwise.data.cache.layout import check_free_space, estimate_cache_bytes, human_bytes
from stackwise.data.cache.reader import ActivationCache
from stackwise.data.cache.store import STORES, StorePlan, StoreRates, choose_store, free_bytes, probe_write_rate
from stackwise.data.stage_data import TokenStageData, cache_rows
from stackwise.data.tokens import TokenSplits, load_token_splits
from stackwise.model.prefix import forward_rate
from stackwise.model.stats import param_counts
from stackwise.objective.masking import UniformSchedule, build_schedule
from stackwise.pipeline.ranks import write_once
from stackwise.pipeline.stage import Stage
from stackwise.utils import derive_seed

log = logging.getLogger("stackwise")


class StageInputs:
    def __init__(self, run: RunConfig, paths: art.ExperimentPaths):
        self.run, self.paths = run, paths
        self.schedule = build_schedule(run.masking, run.layer_stages)
        self._splits: TokenSplits | None = None
        self._cache_bytes: int | None = None

    def splits(self) -> TokenSplits:
        """The token splits, tokenized (and cached under tokens/) on first use."""
        if self._splits is None:
            self._splits = load_token_splits(self.run.data, self.run.seed, self.paths.tokens_dir)
        return self._splits

    def tokens(self, stage: Stage, max_steps: int) -> TokenStageData:
        """Masked token batches: the training stream of `max_steps` steps, validation and caching views.
        The fusion fine-tune trains at `fusion.mask_fraction_min/max` when set (validated at the
        `masking` node's rates, which the fusion check compares with the last stage's loss)."""
        s, run, cfg = self.splits(), self.run, self.run.model
        rates = run.finetune_rates() if stage.kind in ("fusion", "finetune") else None
        return TokenStageData(
            s.train,
            s.val,
            batch_size=run.data.batch_size,
            seed=run.seed,
            schedule=self.schedule,
            mask_id=cfg.mask_id,
            pad_id=cfg.pad_id,
            k=stage.k if stage.kind == "layer" else 0,  # 0: every layer (per_layer cycles its rates)
            max_steps=max(1, max_steps),
            views=run.cache.views,
            num_workers=run.data.num_workers,
            cache_rows=cache_rows(len(s.train), run.cache_train_sequences(), run.seed),
            cache_batch_size=run.cache.batch_size,
            per_layer_views=run.masking.schedule == "per_layer",
            n_layers=run.layer_stages,
            train_schedule=None if rates is None else UniformSchedule(*rates),
        )

    def activations(self, stage: Stage, cache: ActivationCache) -> ActivationDataModule:
        """Layer k's batches: the rows of acts_layer{k-1}, in a stream seeded by the stage."""
        return ActivationDataModule(cache, **self._rows_settings(stage))

    def recomputed(self, stage: Stage) -> RecomputedDataModule:
        """Layer k's batches when it recomputes its input: the rows acts_layer{k-1} would hold, as the
        masked token rows the first caching pass (layer 1's) read, in the same stream as `activations`."""
        cached = [dl.dataset for dl in self.tokens(Stage.layer(1), 1).predict_dataloader()]  # [train, val]
        return RecomputedDataModule(*cached, **self._rows_settings(stage))

    def _rows_settings(self, stage: Stage) -> dict:
        run = self.run
        return dict(
            batch_size=run.data.batch_size,
            seed=derive_seed(run.seed, stage.name),
            num_workers=run.data.num_workers,
            train_views=[stage.below.k] if run.masking.schedule == "per_layer" else None,  # its rate's own view
            max_steps=run.max_steps(stage.budget),
            predict_batch_size=run.cache.batch_size,  # its caching pass, in batches of the first one's size
            pin_memory=run.cache.pin_memory,
            shuffle_block=run.cache.shuffle_block,
            prefetch_factor=run.cache.prefetch_factor,
            to_device=run.cache.device_prefetch,
        )

    # ------------------------------------------------------------------ the caching pass
    def cache_bytes(self) -> int:
        """Bytes one activation cache of this run takes (every cache holds the same rows)."""
        if self._cache_bytes is None:
            run, cfg = self.run, self.run.model
            rows = sum(len(dl.dataset) for dl in self.tokens(Stage.layer(1), 1).predict_dataloader())
            self._cache_bytes = estimate_cache_bytes(
                rows, run.data.seq_len, cfg.d_model, run.cache.dtype, cfg.vocab_size
            )
        return self._cache_bytes

    def cache_loaders(self, stage: Stage, data: RowsDataModule | TokenStageData, kept: int = 1) -> list:
        """The loaders of acts_layer{k}'s caching pass, once the caches still to be written and kept
        (`kept` of them, this one first) are known to fit on its disk (checked before training too:
        hours of training must not end in a full disk)."""
        run, cfg, loaders = self.run, self.run.model, data.predict_dataloader()
        rows = sum(len(dl.dataset) for dl in loaders)
        one = estimate_cache_bytes(rows, run.data.seq_len, cfg.d_model, run.cache.dtype, cfg.vocab_size)
        check_free_space(self.paths.acts_dir(stage.k), one * max(1, kept), max(1, kept))
        return loaders

    def keeps_every_cache(self, to_write: int) -> bool:
        """`cache.keep`: all, last, or auto: all when the `to_write` caches the run has still to write
        fit beside the ones there now, else the last one only. Logged once when auto decides."""
        keep = self.run.cache.keep
        if keep != "auto" or to_write == 0:
            return keep != "last"
        need, free = to_write * self.cache_bytes(), free_bytes(self.paths.acts_root)
        every = need <= free
        log.info(
            "cache.keep=auto: keeping %s (%d cache(s) of %s still to write, %s free under %s)",
            "every cache" if every else "the last cache only",
            to_write,
            human_bytes(self.cache_bytes()),
            human_bytes(free),
            self.paths.acts_root,
        )
        return every


# ---------------------------------------------------------------------------------- cache.store
def device_of(run: RunConfig) -> str:
    """The device type the layer stages run on ("cpu" or "cuda"), from trainer.accelerator."""
    acc = str(run.trainer_kwargs("layer").get("accelerator", "auto")).lower()
    if acc == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda" if acc in ("auto", "gpu", "cuda") else acc


def resolve_store(run: RunConfig, paths: art.ExperimentPaths) -> str:
    """The store this run's layer stages use: `cache.store`, or for auto the one chosen for this
    folder before (paths.store_choice), or else the cheapest on this machine (data/cache/store.py),
    logged in one line saying why and kept for the next run (on a CPU: disk, nothing measured)."""
    store = run.cache.store
    if store != "auto":
        return store
    device = device_of(run)
    if device != "cpu":
        try:
            kept = json.loads(paths.store_choice.read_text())
            if kept.get("store") in STORES:
                log.info(
                    "cache.store=auto chose %s because %s (kept in %s)",
                    kept["store"],
                    kept.get("why"),
                    paths.store_choice,
                )
                return kept["store"]
        except (OSError, ValueError, AttributeError):
            pass
    if device == "cpu":  # nothing to measure: the rule's answer on a CPU
        store, why = choose_store(StoreRates(device), StorePlan(run.layer_stages, 0, 0, 0.0, 0, 0))
        log.info("cache.store=auto chose %s because %s", store, why)
        return store
    store, why = choose_store(measure_rates(run, paths, device), store_plan(run, StageInputs(run, paths)))
    log.info("cache.store=auto chose %s because %s", store, why)

    def keep() -> None:
        paths.root.mkdir(parents=True, exist_ok=True)
        art.atomic_write_json({"store": store, "why": why}, paths.store_choice)

    write_once(keep)
    return store


def store_plan(run: RunConfig, inputs: StageInputs) -> StorePlan:
    """The sizes `cache.store=auto` prices the stores with (data/cache/store.py)."""
    cfg, seq = run.model, run.data.seq_len
    first = inputs.tokens(Stage.layer(1), 1)
    train_rows, val_rows = (len(dl.dataset) for dl in first.predict_dataloader())
    steps = run.max_steps("layer")
    vci = run.trainer_kwargs("layer").get("val_check_interval")
    val_passes = 1 + (steps // vci if isinstance(vci, int) and vci > 0 else 1)
    n = run.layer_stages  # the layer stages: the top segment's blocks are never cached nor recomputed
    every = n - 1 + int(run.cache.last_layer)
    counts = param_counts(cfg)
    prefix_params = counts["embed"]["total"] + sum(counts[f"layer_{k}"]["total"] for k in range(1, n))
    weight_bytes = (
        torch.finfo(getattr(torch, precision_weights(run.trainer_kwargs("layer").get("precision")))).bits // 8
    )
    return StorePlan(
        n_layers=n,
        cache_tokens=(train_rows + val_rows) * seq,
        read_tokens=steps * run.data.batch_size * seq + val_passes * val_rows * seq,
        bytes_per_token=estimate_cache_bytes(1, seq, cfg.d_model, run.cache.dtype, cfg.vocab_size) / seq,
        caches_kept=every if run.cache.keep == "all" else min(2, every),
        prefix_bytes=prefix_params * weight_bytes,
    )


def measure_rates(run: RunConfig, paths: art.ExperimentPaths, device: str) -> StoreRates:
    """The rates `cache.store=auto` prices the stores with, measured here (nothing on a CPU)."""
    if device != "cuda":
        return StoreRates(device=device)
    dev = torch.device("cuda", torch.cuda.current_device())
    precision = str(run.trainer_kwargs("layer").get("precision"))
    weights = getattr(torch, precision_weights(run.trainer_kwargs("layer").get("precision")))
    autocast = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
    autocast_dtype = autocast.get(precision)
    rate = forward_rate(run.model, run.data.batch_size, run.data.seq_len, dev, weights, autocast_dtype)
    memory_dir = Path(run.cache.memory_dir)
    return StoreRates(
        device=device,
        layer_tokens_per_s=rate,
        disk_bytes_per_s=probe_write_rate(paths.root),
        memory_bytes_per_s=probe_write_rate(memory_dir / "stackwise") if memory_dir.is_dir() else 0.0,
        free_disk=free_bytes(paths.root),
        free_memory=free_bytes(memory_dir) if memory_dir.is_dir() else 0,
        free_device=int(torch.cuda.mem_get_info(dev)[0]),
    )
