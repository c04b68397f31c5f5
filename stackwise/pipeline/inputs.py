"""What a stage reads: masked token batches (layer 1, fusion, e2e, and layer 1's caching pass) or the
activation cache of the layer below (layer k >= 2), and the caching pass's loaders once the cache
is known to fit on its disk."""

from __future__ import annotations

from stackwise import artifacts as art
from stackwise.config import RunConfig
from stackwise.data.cache.datamodule import ActivationDataModule
from stackwise.data.cache.layout import check_free_space, estimate_cache_bytes
from stackwise.data.cache.reader import ActivationCache
from stackwise.data.stage_data import TokenStageData, cache_rows
from stackwise.data.tokens import TokenSplits, load_token_splits
from stackwise.objective.masking import build_schedule
from stackwise.pipeline.stage import Stage
from stackwise.utils import derive_seed


class StageInputs:
    def __init__(self, run: RunConfig, paths: art.ExperimentPaths):
        self.run, self.paths = run, paths
        self.schedule = build_schedule(run.masking, run.model.n_layers)
        self._splits: TokenSplits | None = None

    def splits(self) -> TokenSplits:
        """The token splits, tokenized (and cached under tokens/) on first use."""
        if self._splits is None:
            self._splits = load_token_splits(self.run.data, self.run.seed, self.paths.tokens_dir)
        return self._splits

    def tokens(self, stage: Stage, max_steps: int) -> TokenStageData:
        """Masked token batches: the training stream of `max_steps` steps, validation and caching views."""
        s, run, cfg = self.splits(), self.run, self.run.model
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
            n_layers=cfg.n_layers,
        )

    def activations(self, stage: Stage, cache: ActivationCache) -> ActivationDataModule:
        """Layer k's batches: the rows of acts_layer{k-1}, in a stream seeded by the stage."""
        run = self.run
        return ActivationDataModule(
            cache,
            batch_size=run.data.batch_size,
            seed=derive_seed(run.seed, stage.name),
            num_workers=run.data.num_workers,
            train_views=[stage.below.k] if run.masking.schedule == "per_layer" else None,  # its rate's own view
            max_steps=run.max_steps(stage.budget),
            pin_memory=run.cache.pin_memory,
            shuffle_block=run.cache.shuffle_block,
            prefetch_factor=run.cache.prefetch_factor,
            to_device=run.cache.device_prefetch,
        )

    def cache_loaders(self, stage: Stage, data) -> list:
        """The loaders of acts_layer{k}'s caching pass, once the cache is known to fit on its disk
        (checked before training too: hours of training must not end in a full disk)."""
        run, cfg, loaders = self.run, self.run.model, data.predict_dataloader()
        rows = sum(len(dl.dataset) for dl in loaders)
        check_free_space(
            self.paths.acts_dir(stage.k),
            estimate_cache_bytes(rows, run.data.seq_len, cfg.d_model, run.cache.dtype, cfg.vocab_size),
        )
        return loaders
