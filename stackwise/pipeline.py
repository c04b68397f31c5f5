"""The stage graph: what is done, what runs next, what `stage=all` skips.

    embed (k=1) -> layer k=2..L -> fusion (check + optional fine-tune)        e2e (the baseline)

A stage is complete when its checkpoint loads, was made by this run's settings (config hash) and,
when a later stage reads it, its activation cache has a manifest naming that checkpoint's sha256.
Complete stages are skipped; artifacts made by other settings stop the run (or are replaced with
overwrite=true); a stage killed midway resumes from its last Lightning checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import signal
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LambdaCallback, LearningRateMonitor, ModelCheckpoint

from stackwise import artifacts as art
from stackwise.config import FULL_PRECISION, STAGE_KEYS, RunConfig
from stackwise.data import activations as acts
from stackwise.data.stage_data import TokenStageData, cache_rows
from stackwise.data.tokens import load_token_splits
from stackwise.errors import ArtifactError, ConfigError, StackWiseError
from stackwise.lock import experiment_lock
from stackwise.model.stats import train_step_flops
from stackwise.objective.masking import build_schedule
from stackwise.stages.base import StageModule
from stackwise.stages.callbacks import AtomicCheckpointIO, with_progress_bar
from stackwise.stages.full import FullModelStage, assemble
from stackwise.stages.layerwise import LayerwiseStage
from stackwise.utils import derive_seed

log = logging.getLogger("stackwise")

# TEST HOOK (tests/test_resume.py), not a user setting: STACKWISE_TEST_KILL_AT=<point> makes the
# process SIGKILL itself at that named point, to test crash-and-resume at exact places. Points:
#   train:<stage>:<s>    at the start of the batch after optimizer step s (its checkpoint is saved)
#   cache:<k>:<split>:<b>  after cache batch b of split 0 (train) / 1 (val) of acts_layer{k} is written
#   cached:<k>           after every shard of acts_layer{k}, before its manifest
#   saved:<stage>        after layers/layer_k.pt (or fused/model.safetensors, stage fused) is written
# Unset (always, outside tests) it costs one comparison per point and adds no callback.
_KILL_AT = os.environ.get("STACKWISE_TEST_KILL_AT") or None


def _kill_point(point: str) -> None:
    if point == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


class _KillHook(Callback):
    """The Lightning side of the test hook above (added only when STACKWISE_TEST_KILL_AT is set)."""

    def __init__(self, where: str):
        self.where = where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _kill_point(f"train:{self.where}:{trainer.global_step}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        _kill_point(f"cache:{self.where}:{dataloader_idx}:{batch_idx}")


class Pipeline:
    def __init__(self, run: RunConfig):
        self.run = run
        self.cfg = run.model
        self.paths = art.ExperimentPaths(run.exp_dir)
        self.hashes = run.hashes()
        self.schedule = build_schedule(run.masking, run.model.n_layers)
        self._splits = None

    def write_run_config(self) -> None:
        """Keep the resolved config beside the artifacts; untouched when it has not changed."""
        path = self.paths.run_config
        try:
            same = path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(self.run.to_dict()))
        except ValueError:
            same = False
        if not same:
            art.atomic_write_json(self.run.to_dict(), path)

    # ------------------------------------------------------------------ entry point
    def execute(self) -> None:
        run = self.run
        self.check_trainer_keys()
        try:
            self.paths.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StackWiseError(
                f"output_root: cannot create the experiment folder {self.paths.root}: {e.strerror or e}"
            ) from None
        with experiment_lock(self.paths):  # one run at a time per folder, from the first write to the last
            self.check_foreign()
            self.write_run_config()
            if run.stage == "all":
                for k in range(1, self.cfg.n_layers + 1):
                    self.layer_stage(k)
                self.fusion_stage()
                self.finish_all()
            elif run.stage == "embed":
                self.layer_stage(1)
            elif run.stage == "layer":
                self.layer_stage(run.k)
            elif run.stage == "fusion":
                self.fusion_stage()
            elif run.stage == "e2e":
                self.e2e_stage()

    def finish_all(self) -> None:
        """The end of `stage=all`: the table, the depth report when an e2e run is beside it, a sample."""
        if not self.trainer_is_global_zero():
            return
        print_table(art.read_results(self.paths))
        if (self.paths.e2e_dir / "config.json").is_file():
            from stackwise.report import write_report

            md, png = write_report(self.paths.root)
            print(f"depth report: {md} and {png}")
        s = self.run.sample
        if s.enabled and self.run.data.name != "dummy":
            from stackwise.generation import sample_text

            which = "finetuned" if (self.paths.finetuned_dir / "config.json").is_file() else "fused"
            text = sample_text(
                self.paths.root,
                prompt=s.prompt,
                length=s.length,
                steps=s.steps,
                seed=self.run.seed,
                model=which,
                temperature=s.temperature,
                top_k=s.top_k,
            )
            print(f"\nsample from the {which} model (stackwise-generate {self.paths.root} for more):\n{text}\n")

    def tokens_seen(self, stage_key: str, steps: int) -> int:
        """Tokens one stage trained on: every rank's batches (DDP) at every optimizer step."""
        world = (
            torch.distributed.get_world_size()
            if (torch.distributed.is_available() and torch.distributed.is_initialized())
            else 1
        )
        return steps * self.run.tokens_per_step(stage_key) * world

    def write_once(self, write: Callable[[], object]) -> None:
        """Files are written by global rank 0 only (under DDP every rank holds the same weights and
        metrics); the other ranks wait at a barrier, so none reads an artifact before it exists."""
        if self.trainer_is_global_zero():
            write()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    @staticmethod
    def trainer_is_global_zero() -> bool:
        return not (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() != 0
        )

    def check_trainer_keys(self) -> None:
        """A `trainer` (or `stages.<name>.trainer`) key that lightning.Trainer does not take stops here,
        before any work, rather than when that stage's Trainer is built."""
        known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
        for where, node in [("trainer", self.run.trainer)] + [
            (f"stages.{n}.trainer", self.run.stages.of(n).trainer) for n in STAGE_KEYS
        ]:
            for key in node:
                if key not in known:
                    raise ConfigError(f"{where}.{key}", "not an argument of lightning.Trainer (see its documentation)")

    # ------------------------------------------------------------------ state of the experiment
    def check_foreign(self) -> None:
        """Stop (or clear, with overwrite=true) when layer-wise artifacts were made by other settings."""
        first = self.paths.layer_ckpt(1)
        if not first.exists():
            return
        try:
            _, meta = art.load_layer_checkpoint(first)
        except ArtifactError:
            return  # a corrupt file is reported by the stage that needs it
        if meta.get("config_hash") == self.hashes["layer"]:
            return
        if not self.run.overwrite:
            raise ArtifactError(
                f"{first} was made by other settings (config {meta.get('config_hash')}, this run's is "
                f"{self.hashes['layer']}); use overwrite=true to replace them or name=NAME for a new folder"
            )
        log.warning("overwrite=true: removing the layer-wise artifacts of %s", self.paths.root)
        for d in (self.paths.acts_root, self.paths.fused_dir, self.paths.ckpt_root):
            shutil.rmtree(d, ignore_errors=True)
        self.paths.results_json.unlink(missing_ok=True)
        # layer_1.pt goes last: while it is there, a run killed midway is known to hold foreign artifacts
        for k in sorted(self.paths.existing_layers(), reverse=True):
            self.paths.layer_ckpt(k).unlink(missing_ok=True)
        shutil.rmtree(self.paths.layers_dir, ignore_errors=True)

    def layer_meta_expect(self, k: int) -> dict:
        return {"config_hash": self.hashes["layer"], "k": k}

    def needs_cache(self, k: int) -> bool:
        return k < self.cfg.n_layers or self.run.cache.last_layer

    def layer_complete(self, k: int) -> bool:
        path = self.paths.layer_ckpt(k)
        if not path.exists():
            return False
        try:  # a foreign or corrupt file stops the run (overwrite=true: retrained)
            _, meta = art.load_layer_checkpoint(path, expect=self.layer_meta_expect(k))
            prev = self.paths.layer_ckpt(k - 1) if k > 1 else None
            if prev is not None and prev.exists() and meta.get("prev_sha256") != art.sha256_file(prev):
                raise ArtifactError(
                    f"{path} was trained on the activations of another {prev.name} than the one "
                    f"there now (sha256 {str(meta.get('prev_sha256'))[:12]}); use overwrite=true "
                    f"to retrain it"
                )
        except ArtifactError as e:
            if not self.run.overwrite:
                raise
            log.warning("overwrite=true: replacing %s (%s)", path, e)
            path.unlink(missing_ok=True)
            return False
        if not self.needs_cache(k):
            return True
        if not self.paths.acts_manifest(k).exists():
            return False  # never cached, or killed while caching: rebuilt
        try:
            self.open_cache(k)
        except acts.StaleCacheError:
            return False  # made from another layer_k.pt: rebuilt
        except ArtifactError as e:  # a damaged cache (shard missing, truncated, changed) is reported
            if not self.run.overwrite:
                raise ArtifactError(f"{e} (or overwrite=true to rebuild it)") from None
            log.warning("overwrite=true: rebuilding the damaged cache %s", self.paths.acts_dir(k))
            return False
        return True

    def open_cache(self, k: int) -> acts.ActivationCache:
        """acts_layer{k}, checked against the checkpoint that produced it."""
        producer = art.sha256_file(self.paths.layer_ckpt(k))
        return acts.ActivationCache.open(
            self.paths.acts_dir(k),
            verify=self.run.verify,
            expect={
                "config_hash": self.hashes["layer"],
                "producer_sha256": producer,
                "k": k,
                "d_model": self.cfg.d_model,
                "seq_len": self.run.data.seq_len,
            },
        )

    def layer_shas(self) -> list | None:
        """sha256 of layer_1.pt .. layer_L.pt (None while one is missing): what a fused model was made of."""
        paths = [self.paths.layer_ckpt(k) for k in range(1, self.cfg.n_layers + 1)]
        return [art.sha256_file(p) for p in paths] if all(p.is_file() for p in paths) else None

    def fusion_complete(self) -> bool:
        shas = self.layer_shas()
        if shas is None:
            return False
        try:  # made by these settings from exactly these layer checkpoints
            _, _, meta = art.load_safetensors_model(
                self.paths.fused_dir,
                verify=self.run.verify,
                expect={"config_hash": self.hashes["fusion"], "layers_sha256": shas},
            )
        except ArtifactError:
            return False
        return self.run.fusion.finetune_steps == 0 or meta.get("finetuned", False)

    def splits(self):
        if self._splits is None:
            self._splits = load_token_splits(self.run.data, self.run.seed, self.paths.tokens_dir)
        return self._splits

    def token_data(self, k: int, max_steps: int) -> TokenStageData:
        s, run = self.splits(), self.run
        return TokenStageData(
            s.train,
            s.val,
            batch_size=run.data.batch_size,
            seed=run.seed,
            schedule=self.schedule,
            mask_id=self.cfg.mask_id,
            pad_id=self.cfg.pad_id,
            k=k,
            max_steps=max(1, max_steps),
            views=run.cache.views,
            num_workers=run.data.num_workers,
            cache_rows=cache_rows(len(s.train), run.cache_train_sequences(), run.seed),
            cache_batch_size=run.cache.batch_size,
            per_layer_views=run.masking.schedule == "per_layer",
            n_layers=self.cfg.n_layers,
        )

    # ------------------------------------------------------------------ layer-wise stages
    def layer_stage(self, k: int) -> None:
        """Train layer k (or reuse a finished layer_k.pt), then cache acts_layer{k}."""
        run, cfg, name = self.run, self.cfg, _stage_name(k)
        if self.layer_complete(k):
            log.info("stage %s: complete, skipped", name)
            self.drop_stage_ckpt(name)  # left when a run was killed right after finishing the stage
            return
        previous, embed_weight, prev_sha = None, None, None
        if k == 1:
            data = self.token_data(1, run.max_steps("embed"))
        else:
            prev_path = self.paths.layer_ckpt(k - 1)
            if not prev_path.exists():
                raise ArtifactError(
                    f"stage=layer k={k} needs {prev_path}, which does not exist: "
                    f"run {'stage=embed' if k == 2 else f'stage=layer k={k - 1}'} first"
                )
            previous, _ = art.load_layer_checkpoint(prev_path, expect=self.layer_meta_expect(k - 1))
            prev_sha = art.sha256_file(prev_path)
            if not self.paths.acts_manifest(k - 1).exists():
                raise ArtifactError(
                    f"stage=layer k={k} needs the activation cache {self.paths.acts_dir(k - 1)} "
                    f"(no complete manifest.json): rerun stage {_stage_name(k - 1)} to rebuild it"
                )
            cache = self.open_cache(k - 1)
            if cfg.tie_embeddings:
                first, _ = art.load_layer_checkpoint(self.paths.layer_ckpt(1), expect=self.layer_meta_expect(1))
                embed_weight = first["embed.weight"]
            train_views = [k - 1] if run.masking.schedule == "per_layer" else None
            data = acts.ActivationDataModule(
                cache,
                batch_size=run.data.batch_size,
                seed=derive_seed(run.seed, name),
                num_workers=run.data.num_workers,
                train_views=train_views,
                max_steps=run.max_steps("layer"),
            )
        stage_key = "embed" if k == 1 else "layer"
        module = LayerwiseStage(
            cfg,
            k,
            run.optim_for(stage_key),
            run.masking.weighting,
            run.max_steps(stage_key),
            previous=previous,
            embed_weight=embed_weight,
            init=run.layer_init,
        )

        ckpt_path = self.paths.layer_ckpt(k)
        if ckpt_path.exists():  # trained before, killed while caching: reuse the weights
            state, meta = art.load_layer_checkpoint(ckpt_path, expect=self.layer_meta_expect(k))
            module.load_exported(state, meta["frozen_sha256"])
            log.info("stage %s: weights found in %s, rebuilding its cache only", name, ckpt_path)
            self.drop_stage_ckpt(name)
        else:
            if self.needs_cache(k):  # hours of training must not end in a full disk
                self.check_cache_space(data, k)
            t0 = time.time()
            resumed_from = self.fit(module, data, stage_key, name)
            metrics = self.evaluate(module, data.val_dataloader())
            seconds = time.time() - t0
            steps = run.max_steps(stage_key)
            # no wall time in the file: the same settings must give the same bytes (invariant 4)
            meta = {
                "stage": name,
                "k": k,
                "config_hash": self.hashes["layer"],
                "model": cfg.to_dict(),
                "frozen_sha256": module.block.frozen_up_checksum(),
                "prev_sha256": prev_sha,
                "val_loss": metrics["val/loss"],
                "val_acc": metrics["val/masked_acc"],
                "steps": steps,
                "tokens": self.tokens_seen(stage_key, steps),
            }
            state = module.export_state()
            self.write_once(lambda: art.save_layer_checkpoint(ckpt_path, state, meta))
            _kill_point(f"saved:{name}")
            self.record(name, k, meta, seconds, resumed_from)
            self.drop_stage_ckpt(name)  # optimizer state ends with the stage
        if self.needs_cache(k):
            self.write_cache(module, data, k)

    def write_cache(self, module: StageModule, data, k: int) -> None:
        run, acts_dir = self.run, self.paths.acts_dir(k)
        acts.discard_cache(acts_dir)  # we only get here when it is missing, partial or stale
        loaders = self.check_cache_space(data, k)  # before the first shard is written
        writer = acts.CacheWriter(
            acts_dir,
            splits=["train", "val"],
            shard_size=run.cache.shard_size,
            dtype=run.cache.dtype,
            vocab_size=self.cfg.vocab_size,
        )
        trainer = self.plain_trainer(callbacks=[writer] + ([_KillHook(str(k))] if _KILL_AT else []))
        module.eval()
        trainer.predict(module, dataloaders=loaders, return_predictions=False)
        _kill_point(f"cached:{k}")
        self.write_once(
            lambda: acts.write_manifest(
                acts_dir,
                writer.records(),
                {
                    "k": k,
                    "config_hash": self.hashes["layer"],
                    "producer_sha256": art.sha256_file(self.paths.layer_ckpt(k)),
                    "d_model": self.cfg.d_model,
                    "seq_len": run.data.seq_len,
                    "views": run.cache.views,
                    "dtype": run.cache.dtype,
                },
            )
        )

    def check_cache_space(self, data, k: int) -> list:
        """Stop when acts_layer{k} would not fit on its disk; returns the caching loaders."""
        run, loaders = self.run, data.predict_dataloader()
        rows = sum(len(dl.dataset) for dl in loaders)
        acts.check_free_space(
            self.paths.acts_dir(k),
            acts.estimate_cache_bytes(rows, run.data.seq_len, self.cfg.d_model, run.cache.dtype, self.cfg.vocab_size),
        )
        return loaders

    def drop_stage_ckpt(self, name: str) -> None:
        shutil.rmtree(self.paths.stage_ckpt_dir(name), ignore_errors=True)

    # ------------------------------------------------------------------ fusion and e2e
    def fusion_stage(self) -> None:
        run, cfg = self.run, self.cfg
        if self.fusion_complete():
            log.info("stage fusion: complete, skipped")
            self.drop_stage_ckpt("finetune")
            return
        states = []
        for k in range(1, cfg.n_layers + 1):
            path = self.paths.layer_ckpt(k)
            if not path.exists():
                raise ArtifactError(
                    f"stage=fusion needs {path}, which does not exist: run "
                    f"{'stage=embed' if k == 1 else f'stage=layer k={k}'} first (or stage=all)"
                )
            states.append(art.load_layer_checkpoint(path, expect=self.layer_meta_expect(k)))
            if k > 1 and states[-1][1].get("prev_sha256") != art.sha256_file(self.paths.layer_ckpt(k - 1)):
                raise ArtifactError(
                    f"{path} was trained on the activations of another layer_{k - 1}.pt than the "
                    f"one there now; rerun stage=layer k={k} (overwrite=true) or stage=all"
                )
        model = assemble(cfg, states)
        data = self.token_data(0, max(1, run.fusion.finetune_steps))
        module = FullModelStage(
            cfg,
            run.optim_for("fusion"),
            run.masking.weighting,
            max(1, run.fusion.finetune_steps),
            "fusion",
            model=model,
        )
        t0 = time.time()
        metrics = self.evaluate(module, data.val_dataloader())
        last_meta = states[-1][1]
        if run.fusion.check:
            self.check_fused(metrics["val/loss"], last_meta["val_loss"])
        layer_seconds = sum(
            r["seconds"]
            for r in art.read_results(self.paths)
            if r["stage"] == "embed" or r["stage"].startswith("layer_")
        )
        meta = {
            "config_hash": self.hashes["fusion"],
            "val_loss": metrics["val/loss"],
            "val_acc": metrics["val/masked_acc"],
            "finetuned": False,
            "tokens": sum(m["tokens"] for _, m in states),
            "layers_sha256": self.layer_shas(),
        }
        fused_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self.write_once(lambda: art.save_safetensors_model(self.paths.fused_dir, fused_state, cfg.to_dict(), meta))
        _kill_point("saved:fused")
        self.record("fused", cfg.n_layers, meta, layer_seconds + time.time() - t0)
        if run.fusion.finetune_steps > 0:
            resumed_from = self.fit(module, data, "fusion", "finetune")
            ft = self.evaluate(module, data.val_dataloader())
            steps = run.fusion.finetune_steps
            ft_meta = {
                **meta,
                "val_loss": ft["val/loss"],
                "val_acc": ft["val/masked_acc"],
                "finetuned": True,
                "tokens": meta["tokens"] + self.tokens_seen("fusion", steps),
            }
            ft_state = module.model.state_dict()
            self.write_once(
                lambda: art.save_safetensors_model(self.paths.finetuned_dir, ft_state, cfg.to_dict(), ft_meta)
            )
            # the fused record goes last: it says the whole fusion stage is complete
            self.write_once(
                lambda: art.save_safetensors_model(
                    self.paths.fused_dir, fused_state, cfg.to_dict(), {**meta, "finetuned": True}
                )
            )
            self.record("finetuned", cfg.n_layers, ft_meta, layer_seconds + time.time() - t0, resumed_from)
            self.drop_stage_ckpt("finetune")

    def check_fused(self, fused_loss: float, stage_loss: float) -> None:
        """Invariant 3: the fused model reproduces the last stage's validation loss."""
        # The fused model is scored by the same `evaluate` (in the run's precision) that scored each
        # stage, so the check runs in the precision the stages ran in; an fp32 or fp64 run whose cache
        # keeps fp32 inputs reproduces the loss up to summation order. With half precision anywhere, a
        # few roundings may differ: a bf16/fp16 cache rounds layer inputs the fused model keeps, and
        # bf16/fp16 weights or autocast round activations, in kernels that may round otherwise for
        # another batch shape. 2e-2 is about five steps of bf16's relative spacing (2^-8).
        run = self.run
        precisions = [run.trainer.get("precision")] + [
            run.trainer_kwargs(s).get("precision") for s in ("embed", "layer")
        ]
        exact = run.cache.dtype == "float32" and all(p in FULL_PRECISION for p in precisions)
        rtol = 1e-5 if exact else 2e-2
        if abs(fused_loss - stage_loss) > rtol * abs(stage_loss):
            raise StackWiseError(
                f"fusion check failed: the fused model's validation loss {fused_loss:.6f} differs from the last "
                f"stage's {stage_loss:.6f} by more than {rtol:g} relative; the layer checkpoints are inconsistent"
            )
        log.info("fusion check: fused val loss %.6f == last stage %.6f (rtol %g)", fused_loss, stage_loss, rtol)

    def e2e_stage(self) -> None:
        run, cfg = self.run, self.cfg
        try:
            _, _, meta = art.load_safetensors_model(
                self.paths.e2e_dir, expect={"config_hash": self.hashes["e2e"]}, verify=self.run.verify
            )
            log.info("stage e2e: complete, skipped")
            self.drop_stage_ckpt("e2e")
            return
        except ArtifactError:
            pass
        steps = run.max_steps("e2e")
        data = self.token_data(0, steps)
        module = FullModelStage(cfg, run.optim_for("e2e"), run.masking.weighting, steps, "e2e")
        t0 = time.time()
        resumed_from = self.fit(module, data, "e2e", "e2e")
        metrics = self.evaluate(module, data.val_dataloader())
        meta = {
            "config_hash": self.hashes["e2e"],
            "val_loss": metrics["val/loss"],
            "val_acc": metrics["val/masked_acc"],
            "tokens": self.tokens_seen("e2e", steps),
            "steps": steps,
        }
        e2e_state = module.model.state_dict()
        self.write_once(lambda: art.save_safetensors_model(self.paths.e2e_dir, e2e_state, cfg.to_dict(), meta))
        self.record("e2e", cfg.n_layers, meta, time.time() - t0, resumed_from)
        self.drop_stage_ckpt("e2e")
        if self.trainer_is_global_zero():
            print_table(art.read_results(self.paths))

    # ------------------------------------------------------------------ Lightning plumbing
    def fit(self, module: StageModule, data, stage_key: str, name: str) -> int:
        """Train one stage; resumes from ckpt/<name>/last.ckpt when a killed run with these settings left one.

        Returns the optimizer step training started from: 0, or the step of the checkpoint it resumed from.
        """
        run = self.run
        kw = run.trainer_kwargs(stage_key)
        # read by Lightning's ThroughputMonitor for FLOP/s and MFU in TensorBoard (constant per step)
        module.flops_per_batch = train_step_flops(
            run.model,
            stage_key,
            getattr(module, "k", 1),
            run.data.batch_size,
            run.data.seq_len,
            run.masking.mean_rate(),
        )  # per batch: what one forward + backward costs
        ckpt_dir = self.paths.stage_ckpt_dir(name)
        last = self.resume_point(ckpt_dir, {"stage": name, "config_hash": self.hashes[_HASH_OF_STAGE[stage_key]]})
        ckpt_every = int(kw.get("val_check_interval") or 50) if isinstance(kw.get("val_check_interval"), int) else 50
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=ckpt_every)
        logger = self.logger(name)
        # the step Lightning really continued from, read after it restored the checkpoint
        start: dict[str, int] = {}
        started = LambdaCallback(on_train_start=lambda trainer, _: start.setdefault("step", trainer.global_step))
        callbacks = [checkpoint, started] + self.extra_callbacks(logger is not None)
        callbacks += [_KillHook(name)] if _KILL_AT else []
        callbacks = with_progress_bar(callbacks, kw.get("enable_progress_bar"))
        plugins = {} if "plugins" in kw else {"plugins": [AtomicCheckpointIO()]}
        trainer = L.Trainer(
            **kw,
            logger=logger if logger is not None else False,
            callbacks=callbacks,
            default_root_dir=str(self.paths.root),
            **plugins,
        )
        L.seed_everything(derive_seed(run.seed, "dropout", name) % (2**31), workers=True, verbose=False)
        if logger is not None:
            logger.log_hyperparams(_flat_hparams(run, name))
        with warnings.catch_warnings():
            # our train loaders do resume mid-epoch (the sampler starts at global_step), whatever Lightning assumes
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
            trainer.fit(
                module,
                datamodule=data,
                ckpt_path=str(last) if last else None,
                **({"weights_only": True} if last else {}),
            )
        return start.get("step", 0)

    def resume_point(self, ckpt_dir: Path, tag: dict) -> Path | None:
        """ckpt/<stage>/last.ckpt when a killed run with these settings left a readable one, else None.

        The folder's stackwise.json (stage and config hash) is written before Lightning saves anything
        in it, so a checkpoint left by other settings is never resumed from: it stops the run (or is
        dropped with overwrite=true), like every other artifact of another config.
        """
        last, tag_path = ckpt_dir / "last.ckpt", ckpt_dir / "stackwise.json"
        if last.exists():
            try:
                have = json.loads(tag_path.read_text())
            except (OSError, ValueError):
                have = {}
            problem = None
            if not isinstance(have, dict) or have.get("config_hash") is None:
                problem = f"has no readable {tag_path.name} saying which settings made it"
            elif have != tag:
                problem = (
                    f"was made by config {str(have.get('config_hash'))[:12]} (stage {have.get('stage')}) but this "
                    f"run's is {tag['config_hash'][:12]} (stage {tag['stage']})"
                )
            else:
                try:
                    with zipfile.ZipFile(last) as z:  # the archive's directory sits at its end: truncation shows
                        bad = z.testzip() if self.run.verify else None
                    if bad is not None:
                        problem = f"fails its CRC check at {bad!r} (corrupt)"
                except (OSError, zipfile.BadZipFile) as e:
                    problem = f"is not a readable checkpoint (truncated or corrupt: {e})"
            if problem is None:
                log.info("stage %s: resuming from %s", tag["stage"], last)
                return last
            if not self.run.overwrite:
                raise ArtifactError(
                    f"{last} {problem}; use overwrite=true to restart stage {tag['stage']} from "
                    f"scratch, or name=NAME for a new folder"
                )
            log.warning("overwrite=true: dropping %s (%s)", last, problem)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        art.atomic_write_json(tag, tag_path)
        return None

    def evaluate(self, module: StageModule, loader) -> dict:
        """Mean masked CE and accuracy over the whole validation set (every view)."""
        # no_grad, not inference mode: inference-mode metric states would break a later fit of the
        # same module (fusion evaluates the fused model, then fine-tunes it)
        trainer = self.plain_trainer(inference_mode=False)
        (metrics,) = trainer.validate(module, dataloaders=loader, verbose=False)
        return {k: float(v) for k, v in metrics.items()}

    def plain_trainer(self, callbacks=(), inference_mode: bool = True) -> L.Trainer:
        kw = {
            k: v
            for k, v in self.run.trainer.items()
            if k in ("accelerator", "devices", "num_nodes", "strategy", "precision", "enable_progress_bar")
        }
        return L.Trainer(
            **kw,
            logger=False,
            callbacks=with_progress_bar(list(callbacks), kw.get("enable_progress_bar")),
            limit_val_batches=1.0,
            enable_model_summary=False,
            default_root_dir=str(self.paths.root),
            inference_mode=inference_mode,
        )

    def logger(self, version: str):
        if not self.run.logger:
            return None
        return instantiate(self.run.logger, save_dir=str(self.paths.tb_dir), name="", version=version)

    def extra_callbacks(self, have_logger: bool) -> list:
        out = []
        for node in (self.run.callbacks or {}).values():
            if not node:
                continue
            cb = instantiate(node)
            if isinstance(cb, LearningRateMonitor) and not have_logger:
                continue  # it refuses to run without a logger
            out.append(cb)
        return out

    def record(self, stage: str, k: int, meta: dict, seconds: float, resumed_from_step: int | None = None) -> None:
        """One results.json record; a trained stage also says the step it started from (0, or the
        step of the mid-stage checkpoint a killed run left), so a resumed stage is visible there."""
        rec = {
            "stage": stage,
            "k": k,
            "val_loss": meta["val_loss"],
            "val_acc": meta["val_acc"],
            "tokens": meta["tokens"],
            "seconds": seconds,
        }
        if resumed_from_step is not None:
            rec["resumed_from_step"] = resumed_from_step
        self.write_once(lambda: (art.record_result(self.paths, rec), self.log_summary(stage, k, rec)))

    def log_summary(self, stage: str, k: int, rec: dict) -> None:
        """The dashboard's depth view: validation loss against layer index k, fused / e2e beside it."""
        if not self.run.logger:
            return
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.paths.tb_dir / "summary")) as w:
            tag = "depth/val_loss" if stage == "embed" or stage.startswith("layer") else f"depth/val_loss_{stage}"
            w.add_scalar(tag, rec["val_loss"], k)
            w.add_scalar(tag.replace("val_loss", "val_acc"), rec["val_acc"], k)


# which config hash ties a stage's mid-stage checkpoints to its settings
_HASH_OF_STAGE = {"embed": "layer", "layer": "layer", "fusion": "fusion", "e2e": "e2e"}


def _stage_name(k: int) -> str:
    return "embed" if k == 1 else f"layer_{k}"


def _flat_hparams(run: RunConfig, stage: str) -> dict:
    out = {
        "stage": stage,
        "experiment": run.name,
        "seed": run.seed,
        "lr": run.optim_for(
            "fusion"
            if stage == "finetune"
            else ("embed" if stage == "embed" else ("e2e" if stage == "e2e" else "layer"))
        ).lr,
    }
    for key, value in run.model.to_dict().items():
        out[f"model/{key}"] = str(value) if isinstance(value, list) else value
    for key, value in dataclasses.asdict(run.masking).items():
        out[f"masking/{key}"] = str(value) if isinstance(value, (list, tuple)) or value is None else value
    out["data/name"], out["data/seq_len"], out["data/batch_size"] = run.data.name, run.data.seq_len, run.data.batch_size
    return out


def print_table(records: list[dict]) -> None:
    """The end-of-run table: stage, val loss, val accuracy, tokens, time."""
    if not records:
        return
    lines = [f"{'stage':<12}{'val loss':>10}{'val acc':>10}{'tokens':>14}{'time (s)':>10}"]
    for r in records:
        lines.append(
            f"{r['stage']:<12}{r['val_loss']:>10.4f}{r['val_acc']:>10.4f}{r['tokens']:>14,}{r['seconds']:>10.1f}"
        )
    print("\n" + "\n".join(lines) + "\n", flush=True)
