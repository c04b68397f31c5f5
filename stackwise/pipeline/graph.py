"""The stage graph, top to bottom:

    layer 1 (embed) -> layer k = 2..L -> fusion (check + optional fine-tune)        e2e (the baseline)

For each stage: what it needs, whether it is already complete (then it is skipped), run it, save
it, and for a layer stage cache its activations for the next one. Which stages a `stage=` setting
runs: stage.py. What "complete" means: state.py. How a Trainer is built: trainers.py. Who writes
files: ranks.write_once. What is printed: console.py. Hooks for observers: events.py.

Within one process (stage=all) nothing a stage just built is read back from its file: the weights a
stage saved are kept (state.py `remember`) for the next stage and fusion, and a recomputing stage's
frozen prefix (layers 1..k-1, on its device) is kept for the next stage and assembled into the fused
model, each keyed by its layer file's identity (path, inode, size, mtime): a file replaced since is read.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from stackwise import artifacts as art
from stackwise.config import FULL_PRECISION, RunConfig
from stackwise.data.cache.layout import discard_cache, round_trip, shard_rows, write_manifest
from stackwise.data.cache.writer import CacheWriter
from stackwise.errors import StackWiseError
from stackwise.lock import experiment_lock
from stackwise.model.prefix import FrozenPrefix
from stackwise.model.transformer import Block, Embedding, Transformer, empty
from stackwise.model.weights import (
    FusedLayout,
    LayerModules,
    LayerWeights,
    assemble,
    assembled_problem,
    assembled_tensors,
    first_layer,
    fused_tensors,
    loaded_weights,
    loaded_weights_problem,
    next_layer,
)
from stackwise.pipeline import console
from stackwise.pipeline.background import Background
from stackwise.pipeline.events import StageObserver, installed
from stackwise.pipeline.inputs import StageInputs, resolve_store
from stackwise.pipeline.memory import free_bytes, fusion_room, stage_device
from stackwise.pipeline.ranks import world_size, write_once
from stackwise.pipeline.stage import Stage, plan
from stackwise.pipeline.state import ExperimentState, cache_root, file_identity
from stackwise.pipeline.trainers import Trainers
from stackwise.stages.base import StageModule
from stackwise.stages.callbacks import FitTimes, RaiseIfFailed
from stackwise.stages.full import FullModelStage
from stackwise.stages.layerwise import LayerwiseStage

log = logging.getLogger("stackwise")
ASSEMBLED = "the assembled model"  # fused/'s source when written from the model the check assembled


class Pipeline:
    """`Pipeline(run).execute()` runs the stages `run.stage` asks for, skipping the complete ones."""

    def __init__(self, run: RunConfig, observers: Sequence[StageObserver] = ()):
        self.run, self.cfg = run, run.model
        self.stages = plan(run.stage, run.k, self.cfg.n_layers, run.layer_stages)
        # where stage k >= 2 reads its input: cache.store, auto resolved (measured) only for a run with layer stages
        layerwise = any(s.kind == "layer" for s in self.stages) or run.cache.store != "auto"
        self.store = resolve_store(run, art.ExperimentPaths(run.exp_dir)) if layerwise else "disk"
        self.paths = art.ExperimentPaths(run.exp_dir, acts_root=cache_root(run, self.store))
        self.hashes = run.hashes()
        self.observers = [*installed(), *observers]
        self._keep_last: bool | None = None
        self.state = ExperimentState(run, self.paths, self.hashes, self.store)
        self.trainers = Trainers(run, self.paths, self.observers)
        self.inputs = StageInputs(run, self.paths)
        # cache.store=recompute: the frozen layers built so far, so that stage k of a stage=all run
        # builds layer k-1 only (from the weights stage k-1 saved, kept in memory), not 1..k-1 again;
        # fusion then assembles the fused model from them instead of reading every layer file
        self._prefix_layers: dict[int, PrefixLayer] = {}

    def execute(self) -> None:
        self.trainers.check_node()  # a trainer key Lightning does not take stops here, before any work
        self.state.create()
        with experiment_lock(self.paths):  # one run at a time per folder, from the first write to the last
            self.state.adopt(self.run.to_dict())
            run_stage = {"layer": self.layer_stage, "fusion": self.fusion_stage, "e2e": self.e2e_stage}
            for stage in self.stages:
                if stage.kind == "e2e":  # the frozen prefix's device memory goes to e2e (fusion uses it)
                    self._prefix_layers.clear()
                    self.state.forget()
                if torch.cuda.is_initialized():  # each record's peak_gpu_gib is its own stage's
                    torch.cuda.reset_peak_memory_stats()
                run_stage[stage.kind](stage)
            if self.run.stage == "all":
                write_once(lambda: console.finish_all(self.run, self.paths))
            if self.store == "memory" and self.paths.acts_root.is_dir():
                nbytes = sum(f.stat().st_size for f in self.paths.acts_root.rglob("*") if f.is_file())
                log.info(
                    "cache.store=memory: the caches hold %.2f GB of RAM in %s until it is deleted (or a reboot)",
                    nbytes / 1e9,
                    self.paths.acts_root,
                )

    # ------------------------------------------------------------------ layer k
    def layer_stage(self, stage: Stage) -> None:
        """Train layer k (or reuse a finished layer_k.pt), then cache acts_layer{k}."""
        found = self.state.layer(stage)
        if found.complete:
            log.info("stage %s: complete, skipped", stage.name)
            self.state.drop_resume_point(stage)  # left when a run was killed right after finishing the stage
            return
        with timed(stage, "inputs read"):
            # a stage whose weights exist only rebuilds its cache: layer k-1's untied head is not needed
            below_head = "load" if found.weights is None else "if_present"
            data, below, embed_weight, prefix = self.layer_inputs(stage, below_head)
        if found.weights is not None:  # trained before, killed while caching: reuse the weights
            log.info("stage %s: weights found, rebuilding its cache only", stage.name)
            layer = found.weights.modules(self.cfg, stage.k, device=stage_device(self.run, stage.budget))
            self.state.drop_resume_point(stage)
        else:
            with timed(stage, "layer initialised"):
                layer = self.start_layer(stage, below)
        run = self.run
        optim, steps = run.optim_for(stage.budget), run.max_steps(stage.budget)
        module = LayerwiseStage(self.cfg, layer, optim, run.masking.weighting, steps, stage.name, embed_weight, prefix)
        if found.weights is None:
            self.train_layer(stage, module, data)
        if self.state.needs_cache(stage):
            self.cache(stage, module, data)

    def start_layer(self, stage: Stage, below: LayerWeights | None) -> LayerModules:
        """The modules a layer stage starts training from: stage 1 from its (seed, ...) init, stage k
        from layer k-1 (`layerwise.init`). stackwise-import starts stage 1 elsewhere (stackwise/hf/importer.py)."""
        device = stage_device(self.run, stage.budget)  # a one-GPU stage builds its modules there
        top = self.run.layerwise.top_layers
        if stage.first:
            return first_layer(self.cfg, device, top)
        check = not self.state.in_memory(stage.below.k)  # the weights stage k-1 saved in this process: drawn here
        return next_layer(self.cfg, stage.k, self.run.layer_init, below, device, top, check)

    def layer_inputs(
        self, stage: Stage, below_head: str = "load"
    ) -> tuple[L.LightningDataModule, LayerWeights | None, Tensor | None, FrozenPrefix | None]:
        """What layer k trains on and starts from: token data (layer 1), or acts_layer{k-1} and layer
        k-1's weights, plus stage 1's embedding matrix when the head is tied to it; with
        cache.store=recompute the token rows of acts_layer{k-1} and the frozen layers 1..k-1 instead."""
        if stage.first:
            return self.inputs.tokens(stage, self.run.max_steps(stage.budget)), None, None, None
        if self.state.recomputes(stage):
            self.state.layer_stack(needed_by=stage, n=stage.below.k)  # made by these settings, in a chain
            # from memory when stage k-1 ran in this process; read once otherwise, for the prefix too
            below = self.state.load_layer(stage.below, needed_by=stage, head=below_head)[0]
            prefix = self.frozen_prefix(stage, below)
            # the tied head's matrix, as stage 1's file holds it, in fp32, where the prefix is (the stage's
            # device: the stage keeps a copy of its own there, no round trip through the host)
            embed_weight = prefix.embed.weight.detach().to(torch.float32) if self.cfg.tie_embeddings else None
            return self.inputs.recomputed(stage), below, embed_weight, prefix
        below = self.state.load_layer(stage.below, needed_by=stage, head=below_head)[0]
        data = self.inputs.activations(stage, self.state.input_cache(stage.below, needed_by=stage))
        embed_weight = None
        if self.cfg.tie_embeddings:  # stage 1's weights hold it: read layer_1.pt unless it is `below`
            # its embedding only: its head and top segment were replaced by later stages' (head="skip")
            first = (
                below
                if below.embed is not None
                else self.state.load_layer(Stage.layer(1), needed_by=stage, head="skip")[0]
            )
            embed_weight = first.embed["weight"].float()  # built in fp32 as every module (the file may hold bf16)
        return data, below, embed_weight, None

    def frozen_prefix(self, stage: Stage, below: LayerWeights | None = None) -> FrozenPrefix:
        """Layers 1..k-1 for a stage k that recomputes its input, on the stage's device. Each layer is
        built once per process: stage k of a stage=all run reuses stage k-1's blocks and builds
        layer k-1 only, from `below` (layer k-1's weights, which the caller has: from memory when
        stage k-1 saved them in this process, its frozen tensors then drawn without a checksum that
        this process drew itself). A layer file read here has its frozen tensors regenerated and
        checked against its checksum. A file the pipeline replaced is a new inode: read again."""
        device = stage_device(self.run, stage.budget)
        for k in range(1, stage.k):
            key = file_identity(self.paths.layer_ckpt(k))
            if k in self._prefix_layers and self._prefix_layers[k].key == key:
                continue
            if below is not None and k == stage.below.k:
                weights = below
            else:
                weights = self.state.read_layer(Stage.layer(k), head="skip")[0]
            check = not self.state.in_memory(k)  # weights read from the file: their frozen checksum is checked
            self._prefix_layers[k] = PrefixLayer.build(self.cfg, k, weights, device, key, check)
        for k in [k for k in self._prefix_layers if k >= stage.k]:  # not below this stage
            del self._prefix_layers[k]
        blocks = [self._prefix_layers[k].block for k in range(1, stage.k)]
        embed = self._prefix_layers[1].embed
        # each layer's output rounded as its cache would have stored it: stage k sees the same values
        return FrozenPrefix(embed, blocks, between=partial(round_trip, hidden_dtype=self.run.cache.dtype))

    def train_layer(self, stage: Stage, module: LayerwiseStage, data: L.LightningDataModule) -> None:
        """Fit layer k and save layers/layer_k.pt with what it was trained from and how well it does."""
        if self.state.needs_cache(stage):  # hours of training must not end in a full disk
            self.inputs.cache_loaders(stage, data, self.caches_kept(stage))
        t0 = time.time()
        with timed(stage, "trained and scored"):
            times = FitTimes()
            resumed = self.trainers.fit(stage, module, data, self.state.resume_point(stage), [times])
            log.info("stage %s: fit: %s", stage.name, times.summary())
            weights, dtype = self.saved_weights(stage, module)
            scores = self.trainers.validate(module, data.val_dataloader())
        seconds, steps = time.time() - t0, self.run.max_steps(stage.budget)
        below = self.state.sha256(self.paths.layer_ckpt(stage.below.k)) if stage.below else None
        # no wall time in the file: the same settings must give the same bytes
        meta = {"stage": stage.name, "k": stage.k, "config_hash": self.hashes["layer"], "model": self.cfg.to_dict()}
        meta.update(prev_sha256=below, **scores, steps=steps, tokens=self.tokens_seen(stage, steps))
        digest: list[str] = []  # the writing rank's
        with timed(stage, f"layer_{stage.k}.pt saved ({dtype})"):
            write_once(lambda: digest.append(art.save_layer_checkpoint(self.paths.layer_ckpt(stage.k), weights, meta)))
        # the next stage starts from these weights, fusion holds them: neither reads the file again
        self.state.remember(stage, weights, meta, digest[0] if digest else None)
        self.saved(stage)
        self.record(stage, meta, seconds, resumed)
        self.state.drop_resume_point(stage)

    def saved_weights(self, stage: Stage, module: LayerwiseStage) -> tuple[LayerWeights, torch.dtype]:
        """What layers/layer_k.pt will hold (`layerwise.save_dtype`), and the trained modules set to
        exactly that: the stage is scored, and acts_layer{k} cached, with the weights every later
        reader gets from the file (a rerun that finds the file, the next stage, the fused model)."""
        precision = self.run.trainer_kwargs(stage.budget).get("precision")
        dtype = getattr(torch, self.run.layerwise.saved_dtype(precision))
        trained = module.trained_modules()
        # Lightning's teardown has moved them to the host: their frozen checksum is drawn on the stage's GPU
        weights = LayerWeights.of(trained, dtype, draw_on=stage_device(self.run, stage.budget))
        if any(t.dtype != dtype for m in trained if m is not None for t in m.state_dict().values()):
            weights.load_into(trained)
        return weights, dtype

    def cache(self, stage: Stage, module: StageModule, data: L.LightningDataModule) -> None:
        """acts_layer{k}: layer k's output on every cached (sequence, view), then its manifest, last."""
        acts_dir = self.paths.acts_dir(stage.k)
        # we only get here when it is missing, partial or stale; one rank deletes it, before any writes
        write_once(lambda: discard_cache(acts_dir))
        loaders = self.inputs.cache_loaders(stage, data, self.caches_kept(stage))  # before the first shard
        writer = CacheWriter(
            acts_dir,
            splits=["train", "val"],
            shard_size=shard_rows(
                self.run.cache.shard_size, self.run.data.seq_len, self.cfg.d_model, self.run.cache.dtype
            ),
            dtype=self.run.cache.dtype,
            vocab_size=self.cfg.vocab_size,
        )
        t0 = time.time()
        self.trainers.predict(stage, module, loaders, writer)
        for observer in self.observers:
            observer.cached(stage)
        records = writer.records()
        write_once(lambda: write_manifest(acts_dir, records, self.state.cache_meta(stage)))
        if self.keep_last():  # acts_layer{k} is complete: the caches below it are read no more
            older = [self.paths.acts_dir(j) for j in range(1, stage.k) if self.paths.acts_dir(j).exists()]
            write_once(lambda: [discard_cache(d) for d in older])
            if older:
                log.info("cache.keep=last: removed %s", ", ".join(d.name for d in older))
        seconds, nbytes = time.time() - t0, sum(f["bytes"] for r in records for f in r["files"].values())
        log.info(
            "stage %s: cached %.2f GB in %.1f s (%.2f GB/s; predict: %s)",
            stage.name,
            nbytes / 1e9,
            seconds,
            nbytes / 1e9 / seconds,
            writer.timing or "no batch",
        )
        self.record_cache(stage, seconds, nbytes)

    def keep_last(self) -> bool:
        """cache.keep: whether a complete acts_layer{k} replaces the caches below it (auto: decided once
        per run, from the free space and the caches the run has still to write)."""
        if self._keep_last is None:
            self._keep_last = not self.inputs.keeps_every_cache(len(self.caches_to_write(1)))
        return self._keep_last

    def caches_to_write(self, first: int) -> list[Stage]:
        """The layer stages from layer `first` on whose caches this run writes (a complete one is not)."""
        return [
            s
            for s in self.stages
            if s.kind == "layer"
            and s.k >= first
            and self.state.needs_cache(s)
            and not self.paths.acts_manifest(s.k).exists()
        ]

    def caches_kept(self, stage: Stage) -> int:
        """Caches the free-space check before layer k's caching pass counts: this one, and with every
        cache kept, those the run writes after it too (keeping the last only, each replaces the one below)."""
        return 1 if self.keep_last() else max(1, len(self.caches_to_write(stage.k)))

    # ------------------------------------------------------------------ fusion
    def fusion_stage(self, stage: Stage) -> None:
        """Check that the fused model reproduces the last stage's loss (where it fits its device),
        write fused/ (from that model, else streamed from layer_1..L, ..L-m and the top segment:
        the same bytes), then the optional joint fine-tune (`finetune`: fused/ is complete with it)."""
        run, cfg, finetune = self.run, self.cfg, Stage.finetune(stage.k)
        if self.state.fusion_complete():
            log.info("stage fusion: complete, skipped")
            self.drop_held()
            self.state.drop_resume_point(finetune)
            return
        metas = self.state.layer_stack(needed_by=stage)
        room = fusion_room(run)
        if self._prefix_layers and not room.fits_check():  # the frozen prefix's memory goes to the fused model
            self.drop_prefix()
            room = fusion_room(run)
        # the fine-tune comes once the prefix has gone into the fused model: its memory counts as free
        held = self.prefix_bytes(room.bound)
        (replace(room, free=room.free + held) if held and room.free is not None else room).refuse_finetune(
            run.fusion.finetune_steps
        )  # before fusion writes anything
        steps = max(1, run.fusion.finetune_steps)
        data = self.inputs.tokens(stage, steps)
        t0 = time.time()
        module, skipped, layout = None, None, {}
        if room.fits_check():
            layers, drawn, source = self.fusion_layers()
            with timed(stage, f"fused model assembled on {room.device} {source}"):
                model = assemble(cfg, layers, device=room.device, layout=layout, drawn=drawn)
            if held and run.fusion.finetune_steps > 0:
                self.drop_prefix()  # what a stage's cycles (module <-> trainer) still hold of it, before the fine-tune
            optim = run.optim_for(finetune.budget)
            module = FullModelStage(cfg, optim, run.masking.weighting, steps, finetune.name, model)
            with timed(stage, "fused model scored"):
                scores = self.trainers.validate(module, data.val_dataloader())
            if run.fusion.check:
                check_fused(run, scores["val_loss"], metas[-1]["val_loss"])
        else:  # the fused model is the last stage's model by construction: its scores stand for it
            self.drop_prefix()
            skipped = f"skipped: {room.why_not_check()}"
            log.warning("fusion check %s; fused/ records the last stage's validation scores", skipped)
            scores = {"val_loss": metas[-1]["val_loss"], "val_acc": metas[-1]["val_acc"]}
        tokens = sum(meta["tokens"] for meta in metas)
        meta = {"config_hash": self.hashes["fusion"], **scores, "finetuned": False, "tokens": tokens}
        if skipped is not None:
            meta["fusion_check"] = skipped
        meta["layers_sha256"] = self.state.layer_shas()
        # what the layer-wise model cost before fusion: every stage's training and caching pass
        layer_seconds = sum(
            r["seconds"] + r.get("cache_seconds", 0.0) for r in art.read_results(self.paths) if r.get("kind") == "layer"
        )
        stream, source = self.fused_stream(stage, module, layout, room.device)
        if run.fusion.finetune_steps <= 0:
            with timed(stage, f"fused/ written from {source}"):
                self.save_model(stage, self.paths.fused_dir, stream, meta)
            self.drop_held()
            self.record(stage, meta, layer_seconds + time.time() - t0)
            return
        assert module is not None, "refuse_finetune lets a fine-tune through only where the model fits"
        fused = FusedWrite(self, stage, meta, layer_seconds, t0)
        fused.start(stream, source, self.background_write(source, layout, module))
        self.drop_held()  # the stream is consumed: written, or copied to the host for the thread
        finetuned, resumed = self.finetune(finetune, module, data, fused)
        self.record(finetune, finetuned, layer_seconds + time.time() - t0, resumed)
        self.state.drop_resume_point(finetune)

    def background_write(self, source: str, layout: FusedLayout, module: FullModelStage) -> bool:
        """Whether fused/ is written on a thread beside the fine-tune: from the assembled model (the
        layer files' stream is read one layer at a time to bound host memory: it stays so), by a
        single process (under DDP or FSDP rank 0 alone writes while the others wait at a barrier),
        and where its host copy takes at most half the host's available memory."""
        if source != ASSEMBLED or world_size() != 1:
            return False
        state = module.model.state_dict()
        nbytes = sum(state[name].numel() * dtype.itemsize for name, dtype in layout.items())
        free = free_bytes(torch.device("cpu"))
        if free is not None and 2 * nbytes > free:
            log.info("fused/ is written before the fine-tune: its %.2f GB host copy would not fit", nbytes / 1e9)
            return False
        return True

    def fusion_layers(self) -> tuple[Iterator[LayerWeights], set[int], str]:
        """layer_1 … layer_{L-m}'s weights for the fused model, each from this process's memory where
        it holds exactly what the layer file there now holds, else read from the file (one at a time):
        blocks 1..L-m-1 (and the embedding) from the frozen prefix that stage L-m ran
        (cache.store=recompute), built from those files and cast back to their dtypes; layer L-m,
        with its head and top segment, from the weights stage L-m saved. (the layers, those whose
        frozen checksums this process already drew or checked, what they came from: for the log)"""
        last = self.run.layer_stages
        held: dict[int, PrefixLayer] = {}
        for k in range(1, last):
            entry = self._prefix_layers.pop(k, None)
            if entry is None or entry.key != file_identity(self.paths.layer_ckpt(k)):
                continue
            problem = entry.problem()
            if problem is None:
                held[k] = entry
            else:
                log.info("stage fusion: layer %d is read from its file (%s)", k, problem)
        self._prefix_layers.clear()  # what is not held goes now; the rest as it is copied in
        kept = self.state.in_memory(last)
        drawn = set(held) | (set(range(last, self.cfg.n_layers + 1)) if kept else set())
        n = len(held) + kept
        source = (
            "from the trained layers in memory"
            if n == last
            else "from the layer files"
            if n == 0
            else f"from {n} trained layer{'s' * (n > 1)} in memory and {last - n} layer file{'s' * (last - n > 1)}"
        )

        def layers() -> Iterator[LayerWeights]:
            for k in range(1, last + 1):
                entry = held.pop(k, None)
                if entry is not None:
                    yield entry.weights()
                else:
                    yield self.state.read_layer(Stage.layer(k), head="load" if k == last else "skip")[0]
                del entry  # its block, once copied into the fused model, is freed

        return layers(), drawn, source

    def prefix_bytes(self, device: torch.device) -> int:
        """Bytes the frozen prefix holds on `device`."""
        modules = [m for e in self._prefix_layers.values() for m in (e.block, e.embed) if m is not None]
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.device == device]
        return sum(t.numel() * t.element_size() for t in tensors)

    def drop_prefix(self) -> None:
        """Free the frozen prefix's memory (reference cycles of a finished stage's modules included)."""
        self._prefix_layers.clear()
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def drop_held(self) -> None:
        """Fusion is done with what the layer stages left in memory."""
        self._prefix_layers.clear()
        self.state.forget()

    def fused_stream(
        self, stage: Stage, module: FullModelStage | None, layout: FusedLayout, device: torch.device | str | None
    ) -> tuple[Iterable, str]:
        """fused/'s (name, tensor) stream, in the layer files' dtypes, and what it is taken from: the
        assembled model when it still holds the layer files' values exactly (the same bytes, without
        reading every layer file and drawing every frozen tensor again), else the layer files, one
        layer at a time (a model too large to assemble: bounded host memory), their frozen tensors'
        checksums drawn on `device` (where the fused model goes: its GPU in a one-GPU run)."""
        problem = "not assembled" if module is None else assembled_problem(module.model, layout)
        if problem is None:
            return assembled_tensors(module.model, layout), ASSEMBLED
        if module is not None:
            log.info(
                "fused/ is streamed from the layer files: the assembled model does not hold their values (%s)", problem
            )
        return fused_tensors(self.cfg, self.state.layers(needed_by=stage), device=device), "the layer files"

    def finetune(self, stage: Stage, module: FullModelStage, data, fused: FusedWrite) -> tuple[dict, int]:
        """Train the fused model jointly into fused/finetuned/ (while fused/'s weights are written,
        when `fused` writes them in the background), then write fused/'s manifest, last: from then on
        fused/, and the whole fusion stage, is complete. (its meta, the step it resumed from)"""
        try:
            scores, resumed = self.train(stage, module, data, fused.watch())
        except BaseException:
            fused.wait()  # no write left running past the error (its temporary file removed or renamed)
            raise
        fused.finish()
        tokens = fused.meta["tokens"] + self.tokens_seen(stage, self.run.fusion.finetune_steps)
        meta = {**fused.meta, **scores, "finetuned": True, "tokens": tokens}
        with timed(stage, "fused/finetuned/ saved"):
            self.save_model(stage, self.paths.finetuned_dir, module.model.state_dict(), meta)
        fused.complete()
        return meta, resumed

    # ------------------------------------------------------------------ e2e
    def e2e_stage(self, stage: Stage) -> None:
        """The same model trained end to end on the layer-wise token budget: the baseline."""
        run, cfg = self.run, self.cfg
        if self.state.e2e_complete():
            log.info("stage e2e: complete, skipped")
            self.state.drop_resume_point(stage)
            return
        steps = run.max_steps(stage.budget)
        data = self.inputs.tokens(stage, steps)
        # built where it trains, as a layer stage's modules are (a one-GPU run: its GPU), with the
        # values of a CPU build; built on the host, the frozen draws alone took 30 s at the seed's sizes
        with timed(stage, "model initialised"):
            model = empty(lambda: Transformer(cfg), stage_device(run, stage.budget))
            model.init_weights()
        module = FullModelStage(cfg, run.optim_for(stage.budget), run.masking.weighting, steps, stage.name, model)
        t0 = time.time()
        scores, resumed = self.train(stage, module, data)
        meta = {"config_hash": self.hashes["e2e"], **scores, "tokens": self.tokens_seen(stage, steps), "steps": steps}
        self.save_model(stage, self.paths.e2e_dir, module.model.state_dict(), meta)
        self.record(stage, meta, time.time() - t0, resumed)
        self.state.drop_resume_point(stage)
        write_once(lambda: console.print_table(art.read_results(self.paths)))

    # ------------------------------------------------------------------ shared steps
    def train(
        self, stage: Stage, module: StageModule, data: L.LightningDataModule, extra: Sequence[Callback] = ()
    ) -> tuple[dict[str, float], int]:
        """Fit `stage` (from the checkpoint a killed run left, if any), then score it: ({val_loss,
        val_acc}, the optimizer step training started from: 0, or the resumed checkpoint's). Logs
        where the time went (Lightning's set-up, the batches, validation, scoring)."""
        times = FitTimes()
        t0 = time.perf_counter()
        resumed = self.trainers.fit(stage, module, data, self.state.resume_point(stage), [times, *extra])
        log.info("stage %s: fit in %.1f s (%s)", stage.name, time.perf_counter() - t0, times.summary())
        with timed(stage, "scored"):
            scores = self.trainers.validate(module, data.val_dataloader())
        return scores, resumed

    def tokens_seen(self, stage: Stage, steps: int) -> int:
        """Tokens one stage trained on: the global batch (every rank's share) at every optimizer step."""
        return steps * self.run.tokens_per_step(stage.budget)

    def save_model(self, stage: Stage, folder, state: dict | Iterable[tuple[str, Tensor]], meta: dict) -> None:
        """A model folder from a state dict or a stream of (name, tensor) (consumed by the writing rank only)."""
        write_once(lambda: art.save_safetensors_model(folder, state, self.cfg.to_dict(), meta))
        self.saved(stage)

    def saved(self, stage: Stage) -> None:
        for observer in self.observers:
            observer.saved(stage)

    def record_cache(self, stage: Stage, seconds: float, nbytes: int) -> None:
        """Add the caching pass's wall time and bytes to the layer's results.json record (its
        `seconds` are training and scoring only): what a layer stage costs in all is their sum."""

        def write() -> None:
            for rec in art.read_results(self.paths):
                if rec.get("stage") == stage.record:
                    art.record_result(self.paths, {**rec, "cache_seconds": seconds, "cache_bytes": nbytes})

        write_once(write)

    def record(self, stage: Stage, meta: dict, seconds: float, resumed_from_step: int | None = None) -> None:
        """One results.json record (and the TensorBoard depth summary) per finished stage; a trained
        stage also says the step it started from, so a resumed stage is visible there."""
        rec = {
            "stage": stage.record,
            "kind": stage.kind,
            "k": stage.k,
            "val_loss": meta["val_loss"],
            "val_acc": meta["val_acc"],
            "tokens": meta["tokens"],
            "seconds": seconds,
        }
        if resumed_from_step is not None:
            rec["resumed_from_step"] = resumed_from_step
        if torch.cuda.is_initialized():
            rec["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30

        def write() -> None:
            art.record_result(self.paths, rec)
            if self.run.logger:
                console.log_depth(self.paths, stage, rec)

        write_once(write)


class FusedWrite:
    """fused/ of a fusion stage that a joint fine-tune follows.

    Its weights are written already marked fine-tuned (`finetuned: true` in their header) and its
    manifest, config.json, only once fused/finetuned/ is complete (`complete`): until then no reader
    trusts the folder (a run killed in between leaves fused/ without a manifest, and the rerun redoes
    the fusion stage, as it always did with a fine-tune left unfinished), and fused/ is never rewritten
    to flip that mark (reading, rewriting and hashing 3.6 GB again at the seed's sizes).

    In the background (`start(..., background=True)`) the weights are first copied to the host in
    the dtypes they are saved in (the fine-tune changes the model in place), then written, hashed
    and fsync'ed on a thread while the fine-tune trains; `finish` waits for it after the fine-tune's
    fit and scoring. Its error is raised in the pipeline's thread, as the same exception: after the
    first training batch that sees it (`watch`), else by `finish`."""

    def __init__(self, pipe: Pipeline, stage: Stage, meta: dict, layer_seconds: float, t0: float):
        self.pipe, self.stage, self.meta = pipe, stage, meta
        self.layer_seconds, self.t0 = layer_seconds, t0
        self.done_meta = {**meta, "finetuned": True}  # fused/'s meta once the fine-tune is complete
        self.files: dict = {}  # its weights files' records for the manifest (on the writing rank)
        self.job: Background | None = None
        self.source = ""
        self.handed = 0.0  # time.time() when the weights went to the thread

    @property
    def folder(self):
        return self.pipe.paths.fused_dir

    def start(self, stream: Iterable[tuple[str, Tensor]], source: str, background: bool) -> None:
        self.source = source
        if not background:
            with timed(self.stage, f"fused/ written from {source}"):
                write_once(lambda: self.files.update(art.write_model_weights(self.folder, stream, self.done_meta)))
            self.written(time.time() - self.t0)
            return
        art.begin_model_write(self.folder)  # untrusted from now on, before the thread starts
        t0 = time.perf_counter()
        tensors = list(stream)  # host copies of their own, in the saved dtypes: bounded by fused/'s size
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        log.info(
            "stage %s: fused/ copied to the host (%.2f GB) in %.1f s; written beside the fine-tune",
            self.stage.name,
            nbytes / 1e9,
            time.perf_counter() - t0,
        )
        self.job = Background(partial(art.write_model_weights, self.folder, tensors, self.done_meta), "fused-write")
        self.handed = time.time()

    def watch(self) -> list[Callback]:
        """The fine-tune's callbacks: stop at the first batch after the write has failed."""
        return [] if self.job is None else [RaiseIfFailed(self.job.failed)]

    def wait(self) -> None:
        if self.job is not None:
            self.job.wait()

    def finish(self) -> None:
        """The weights are written (waits for the thread, raises its error): record the stage."""
        if self.job is None:
            return
        self.files.update(self.job.result())
        log.info(
            "stage %s: fused/ written from %s in %.1f s, beside the fine-tune (waited %.1f s for it after)",
            self.stage.name,
            self.source,
            self.job.seconds,
            self.job.waited,
        )
        # what fusion cost the run: up to the hand-off, and the wait for the write the fine-tune did not hide
        self.written(self.handed - self.t0 + self.job.waited)

    def written(self, seconds: float) -> None:
        self.pipe.saved(self.stage)
        self.pipe.record(self.stage, self.meta, self.layer_seconds + seconds)

    def complete(self) -> None:
        """fused/'s manifest, last (one rank writes it; the weights' records are that rank's)."""
        with timed(self.stage, "fused/ complete (config.json written)"):
            write_once(
                lambda: art.write_model_manifest(self.folder, self.pipe.cfg.to_dict(), self.done_meta, self.files)
            )


@contextlib.contextmanager
def timed(stage: Stage, what: str) -> Iterator[None]:
    """Log how long one step of a stage took (where a stage's wall time goes, beside its training)."""
    t0 = time.perf_counter()
    yield
    log.info("stage %s: %s in %.1f s", stage.name, what, time.perf_counter() - t0)


def check_fused(run: RunConfig, fused_loss: float, stage_loss: float) -> None:
    """The fused model reproduces the last stage's validation loss.

    The fused model is scored by the same `validate` (in the run's precision) that scored each
    stage, so the check runs in the precision the stages ran in; an fp32 or fp64 run whose cache
    keeps fp32 inputs reproduces the loss up to summation order. With half precision anywhere, a
    few roundings may differ: a bf16/fp16 cache rounds layer inputs the fused model keeps, and
    bf16/fp16 weights or autocast round activations, in kernels that may round otherwise for
    another batch shape. 2e-2 is about five steps of bf16's relative spacing (2^-8).
    """
    precisions = [run.trainer.get("precision")] + [run.trainer_kwargs(s).get("precision") for s in ("embed", "layer")]
    exact = run.cache.dtype == "float32" and all(p in FULL_PRECISION for p in precisions)
    rtol = 1e-5 if exact else 2e-2
    if abs(fused_loss - stage_loss) > rtol * abs(stage_loss):
        raise StackWiseError(
            f"fusion check failed: the fused model's validation loss {fused_loss:.6f} differs from the last "
            f"stage's {stage_loss:.6f} by more than {rtol:g} relative; the layer checkpoints are inconsistent"
        )
    log.info("fusion check: fused val loss %.6f == last stage %.6f (rtol %g)", fused_loss, stage_loss, rtol)


@dataclass
class PrefixLayer:
    """Layer k of a recomputing stage's frozen prefix, built from layer_k.pt (`key`: that file's
    identity), with what fusion needs to take the file's weights back from it (`loaded_weights`)."""

    key: tuple | None
    block: Block
    embed: Embedding | None  # layer 1's only
    dtypes: dict[str, torch.dtype]  # the file's block tensors' dtypes, in its order
    embed_dtypes: dict[str, torch.dtype] | None
    frozen_sha256: str

    @classmethod
    def build(cls, cfg, k: int, weights: LayerWeights, device: torch.device, key: tuple | None, check: bool):
        """`check`: regenerate the frozen tensors and check them against the file's checksum (False:
        weights whose checksum this process drew itself; they are drawn on `device` all the same)."""
        block = empty(lambda: Block(cfg, k), device)  # built on the meta device: nothing drawn
        weights.load_block(block, check=check)
        embed = None
        if k == 1:
            embed = empty(lambda: Embedding(cfg), device)
            embed.load_state_dict(weights.embed)
        dtypes = {n: t.dtype for n, t in weights.block.items()}
        embed_dtypes = None if embed is None else {n: t.dtype for n, t in weights.embed.items()}
        return cls(key, block, embed, dtypes, embed_dtypes, weights.frozen_sha256)

    def problem(self) -> str | None:
        return loaded_weights_problem(self.block, self.dtypes, self.embed, self.embed_dtypes)

    def weights(self) -> LayerWeights:
        return loaded_weights(self.block, self.dtypes, self.frozen_sha256, self.embed, self.embed_dtypes)
