"""What the experiment folder holds, judged against this run's settings.

A stage is complete when its artifact loads, was made by this run's settings (config hash) and,
for a layer that a later stage reads from a cache (not `cache.store=recompute`), its activation
cache has a manifest naming that layer's sha256, or, unless every cache is kept (`cache.keep=all`),
the stage above it is complete without it. Artifacts made by other settings stop the run (or are
replaced with overwrite=true); a mid-stage checkpoint is resumed from only when it was tagged with
these settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stackwise import artifacts as art
from stackwise.artifacts.checkpoints import PROJ
from stackwise.artifacts.messages import json_normal
from stackwise.config import RunConfig
from stackwise.data.cache.reader import ActivationCache, StaleCacheError
from stackwise.errors import ArtifactError, ConfigError, StackWiseError
from stackwise.model.weights import LayerWeights, TopBlock
from stackwise.pipeline.ranks import write_once
from stackwise.pipeline.stage import Stage

log = logging.getLogger("stackwise")


def file_identity(path: Path) -> tuple[str, int, int, int] | None:
    """(path, inode, size, mtime) of a file, None when it is not there. The pipeline only ever
    replaces a file (a new inode), so an unchanged identity is the same bytes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class KeptLayer:
    """The weights this process last saved to layer_k.pt, as that file (and the files beside it)
    were right after the save: `identity`."""

    k: int
    identity: tuple
    weights: LayerWeights
    meta: dict


@dataclass
class LayerFound:
    """layer_k.pt as this run finds it: its weights when they are valid for these settings, and whether
    the stage is complete (weights + the cache a later stage reads)."""

    weights: LayerWeights | None = None
    complete: bool = False


def _copy(d: dict | None) -> dict | None:
    return None if d is None else dict(d)


def cache_root(run: RunConfig, store: str | None = None) -> Path | None:
    """Where this run's acts_layer{k}/ folders live: None = the experiment's own acts/
    (cache.store=disk, and recompute's last layer); for `store` memory (default: cache.store) a folder
    of the RAM-backed cache.memory_dir named by the experiment folder's name and a hash of its
    absolute path (two experiments never share it)."""
    if (store or run.cache.store) != "memory":
        return None
    base = Path(run.cache.memory_dir)
    if not base.is_dir():
        raise ConfigError("cache.memory_dir", f"{base} is not a folder (cache.store=memory keeps the caches there)")
    exp = Path(run.exp_dir).resolve()
    return base / "stackwise" / f"{exp.name}-{hashlib.sha256(str(exp).encode()).hexdigest()[:12]}"


class ExperimentState:
    """`store`: where stage k >= 2 reads its input (disk, memory, recompute: cache.store resolved)."""

    def __init__(self, run: RunConfig, paths: art.ExperimentPaths, hashes: dict[str, str], store: str = "disk"):
        self.run, self.paths, self.hashes, self.store = run, paths, hashes, store
        self._sha256: dict[tuple[Path, int, int, int], str] = {}
        # the weights of the layer file this process saved last: the next stage starts from them and
        # fusion holds them, without reading (and checking) the file again. One layer only: the
        # frozen layers below it live in the pipeline's frozen prefix (cache.store=recompute).
        self._kept: KeptLayer | None = None
        self._metas: dict[tuple, dict] = {}  # layer files' metadata, by file identity

    def sha256(self, path: Path) -> str:
        """sha256 of an artifact, read once per run: a stage asks for the same multi-GB layer file's
        several times (the chain check, the cache it reads, the manifest it writes). The pipeline only
        ever replaces a file (a new inode), so an unchanged (path, inode, size, mtime) is the same bytes."""
        st = path.stat()
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._sha256:
            self._sha256[key] = art.sha256_file(path)
        return self._sha256[key]

    # ------------------------------------------------------------------ weights kept in memory
    def layer_identity(self, k: int) -> tuple | None:
        """The identity of layer_k.pt and of the untied projection and top segment it keeps beside
        it (None for one that is not there): what `load_layer_checkpoint` would read."""
        path = self.paths.layer_ckpt(k)
        own = file_identity(path)
        if own is None:
            return None
        return own, file_identity(self.paths.head_file(k)), file_identity(self.paths.top_file(k))

    def remember(self, stage: Stage, weights: LayerWeights, meta: dict, sha256: str | None = None) -> None:
        """`weights` and `meta` were just written to layer_k.pt (`sha256`: its digest, where this rank
        wrote it): later reads of that file, unchanged, are served from memory. Replaces the layer
        kept before."""
        path = self.paths.layer_ckpt(stage.k)
        identity = self.layer_identity(stage.k)
        if weights.top:  # in the order the file's top segment reads back in (safetensors: by name)
            top = {
                j: TopBlock({n: b.block[n] for n in sorted(b.block)}, b.frozen_sha256)
                for j, b in sorted(weights.top.items())
            }
            weights = LayerWeights(weights.block, weights.frozen_sha256, weights.head, weights.embed, top)
        self._kept = None if identity is None else KeptLayer(stage.k, identity, weights, json_normal(meta))
        if identity is not None and sha256 is not None:
            _, ino, size, mtime = identity[0]
            self._sha256[(path, ino, size, mtime)] = sha256

    def forget(self) -> None:
        self._kept = None

    def in_memory(self, k: int) -> bool:
        """Whether layer_k.pt's weights are the ones this process saved to it (the file unchanged since)."""
        kept = self._kept
        return kept is not None and kept.k == k and kept.identity == self.layer_identity(k)

    def kept_layer(self, k: int, head: str = "load") -> tuple[LayerWeights, dict] | None:
        """What `load_layer_checkpoint(layer_k.pt, head=head)` returns, from memory (None: read it):
        the same tensors (the file was written from them), without the untied projection and top
        segment for head="skip". The dicts are new, the tensors shared: readers copy them, never
        write into them."""
        if not self.in_memory(k):
            return None
        w = self._kept.weights
        if head == "skip":
            head_state = {n: t for n, t in w.head.items() if n != PROJ}
            weights = LayerWeights(dict(w.block), w.frozen_sha256, head_state, _copy(w.embed), None)
        else:
            weights = LayerWeights(dict(w.block), w.frozen_sha256, dict(w.head), _copy(w.embed), _copy(w.top))
        return weights, dict(self._kept.meta)

    def read_layer(self, stage: Stage, head: str = "load") -> tuple[LayerWeights, dict]:
        """layer_k.pt's weights and meta, checked as made by these settings: from memory when it is
        the file this process saved last, else read (and checked) from the file."""
        path = self.paths.layer_ckpt(stage.k)
        kept = self.kept_layer(stage.k, head)
        if kept is None:
            return art.load_layer_checkpoint(path, expect=self.layer_expect(stage), head=head)
        art.check_expected(path, kept[1], self.layer_expect(stage))
        return kept

    # ------------------------------------------------------------------ the folder as a whole
    def create(self) -> None:
        try:
            self.paths.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StackWiseError(
                f"output_root: cannot create the experiment folder {self.paths.root}: {e.strerror or e}"
            ) from None

    def adopt(self, run_config: dict) -> None:
        """Stop at (or clear) foreign layer-wise artifacts; keep the resolved config beside them."""
        self.check_foreign()
        path = self.paths.run_config
        try:  # untouched when it has not changed
            same = path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(run_config))
        except ValueError:
            same = False
        if not same:
            art.atomic_write_json(run_config, path)

    def check_foreign(self) -> None:
        """Stop (or clear, with overwrite=true) when layer-wise artifacts were made by other settings."""
        first = self.paths.layer_ckpt(1)
        if not first.exists():
            return
        try:
            meta = art.read_layer_meta(first)  # its settings only: the tensors are read by the stage that needs them
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

    # ------------------------------------------------------------------ layer-wise stages
    def layer_expect(self, stage: Stage) -> dict:
        return {"config_hash": self.hashes["layer"], "k": stage.k}

    def recomputes(self, stage: Stage) -> bool:
        """Layer stage k >= 2 runs layers 1..k-1 itself instead of reading acts_layer{k-1}."""
        return not stage.first and self.store == "recompute"

    def needs_cache(self, stage: Stage) -> bool:
        """A later stage reads acts_layer{k} (or cache.last_layer asks for the last one too)."""
        if stage.k >= self.run.layer_stages:
            return self.run.cache.last_layer
        return not self.recomputes(Stage.layer(stage.k + 1))

    def superseded(self, stage: Stage) -> bool:
        """acts_layer{k} is needed no more: layer_{k+1}.pt was trained on this layer_k.pt with these
        settings, and its own cache is complete (or, in turn, needed no more, or needed by nobody).
        What a run keeping the last cache only leaves behind (or a user who deleted caches): unless
        cache.keep=all, such a stage is complete without its cache, which is not rebuilt."""
        if stage.k >= self.run.layer_stages:
            return False
        above, path = Stage.layer(stage.k + 1), self.paths.layer_ckpt(stage.k + 1)
        try:
            meta = art.read_layer_meta(path) if path.is_file() else {}
        except ArtifactError:
            return False
        if (meta.get("config_hash"), meta.get("k")) != (self.hashes["layer"], above.k):
            return False
        if meta.get("prev_sha256") != self.sha256(self.paths.layer_ckpt(stage.k)):
            return False
        if not self.needs_cache(above):
            return True
        if self.paths.acts_manifest(above.k).exists():
            try:
                self.open_cache(above)
                return True
            except ArtifactError:
                pass
        return self.superseded(above)

    def layer(self, stage: Stage) -> LayerFound:
        """layer_k.pt: absent, valid (and its cache complete or not), or foreign/corrupt, which stops
        the run (overwrite=true: removed, to be retrained)."""
        path = self.paths.layer_ckpt(stage.k)
        if not path.exists():
            return LayerFound()
        try:
            weights, meta = art.load_layer_checkpoint(path, expect=self.layer_expect(stage))
            problem = self.chain_problem(stage, meta)
            if problem:
                raise ArtifactError(f"{problem}; use overwrite=true to retrain it")
        except ArtifactError as e:
            if not self.run.overwrite:
                raise
            log.warning("overwrite=true: replacing %s (%s)", path, e)
            path.unlink(missing_ok=True)
            return LayerFound()
        done = not self.needs_cache(stage) or self.cache_complete(stage)
        return LayerFound(weights, complete=done or (self.run.cache.keep != "all" and self.superseded(stage)))

    def cache_complete(self, stage: Stage) -> bool:
        if not self.paths.acts_manifest(stage.k).exists():
            return False  # never cached, or killed while caching: rebuilt
        try:
            self.open_cache(stage)
        except StaleCacheError:
            return False  # made from another layer_k.pt: rebuilt
        except ArtifactError as e:  # a damaged cache (shard missing, truncated, changed) is reported
            if not self.run.overwrite:
                raise ArtifactError(f"{e} (or overwrite=true to rebuild it)") from None
            log.warning("overwrite=true: rebuilding the damaged cache %s", self.paths.acts_dir(stage.k))
            return False
        return True

    def open_cache(self, stage: Stage) -> ActivationCache:
        """acts_layer{k}, checked against the layer checkpoint that produced it."""
        return ActivationCache.open(
            self.paths.acts_dir(stage.k), verify=self.run.verify, expect=self.cache_meta(stage, check=True)
        )

    def cache_meta(self, stage: Stage, check: bool = False) -> dict:
        """What acts_layer{k}'s manifest records (`check`: the part a reader checks)."""
        meta = {
            "k": stage.k,
            "config_hash": self.hashes["layer"],
            "producer_sha256": self.sha256(self.paths.layer_ckpt(stage.k)),
            "d_model": self.run.model.d_model,
            "seq_len": self.run.data.seq_len,
        }
        return meta if check else {**meta, "views": self.run.cache.views, "dtype": self.run.cache.dtype}

    def chain_problem(self, stage: Stage, meta: dict) -> str | None:
        """Layer k must have been trained on the activations of the layer_{k-1}.pt there now."""
        below = self.paths.layer_ckpt(stage.below.k) if stage.below else None
        if below is None or not below.exists() or meta.get("prev_sha256") == self.sha256(below):
            return None
        return (
            f"{self.paths.layer_ckpt(stage.k)} was trained on the activations of another {below.name} than the "
            f"one there now (sha256 {str(meta.get('prev_sha256'))[:12]})"
        )

    def load_layer(self, stage: Stage, needed_by: Stage, head: str = "load") -> tuple[LayerWeights, dict]:
        """layer_k.pt and its metadata as the input of `needed_by`; a missing one names the command that
        writes it. `head`: whether its untied projection must be there ("load": a stage starts from it)
        or not ("if_present": a stage that only rebuilds its cache, after later layers replaced it)."""
        path = self.paths.layer_ckpt(stage.k)
        if not path.exists():
            raise ArtifactError(
                f"{needed_by.command} needs {path}, which does not exist: run {stage.command} first"
                + (" (or stage=all)" if needed_by.kind == "fusion" else "")
            )
        return self.read_layer(stage, head)

    def layer_meta(self, path: Path) -> dict:
        """A layer file's metadata, read once per file identity (every later stage checks the stack
        below it): the kept layer's from memory."""
        identity = file_identity(path)
        kept = self._kept
        if kept is not None and identity is not None and kept.identity[0] == identity:
            return dict(kept.meta)
        if identity is None:
            return art.read_layer_meta(path)  # the one-line error naming it
        if identity not in self._metas:
            self._metas[identity] = art.read_layer_meta(path)
        return dict(self._metas[identity])

    def layer_stack(self, needed_by: Stage, n: int | None = None) -> list[dict]:
        """The metadata of layer_1.pt … layer_n.pt (n = the last layer stage, L-m: fusion; k-1: the
        layers a stage k recomputes), each made by these settings and trained on the activations of
        the one below it (their tensors are read later, one layer at a time: `layers`)."""
        metas = []
        for k in range(1, (self.run.layer_stages if n is None else n) + 1):
            stage, path = Stage.layer(k), self.paths.layer_ckpt(k)
            if not path.exists():
                self.load_layer(stage, needed_by)  # the one-line error naming the command that writes it
            meta = self.layer_meta(path)
            art.check_expected(path, meta, self.layer_expect(stage))
            problem = self.chain_problem(stage, meta)
            if problem:
                raise ArtifactError(f"{problem}; rerun {stage.command} (overwrite=true) or stage=all")
            metas.append(meta)
        return metas

    def layers(self, needed_by: Stage, n: int | None = None) -> Iterator[LayerWeights]:
        """layer_1 … layer_n's weights (n = the last layer stage, L-m, by default), each read (and
        checked) when asked for: one layer in memory at a time. Layer L-m comes with its untied output
        projection and its top segment, which the fused model holds; a recomputed prefix (n < L-m)
        needs neither."""
        last = self.run.layer_stages
        for k in range(1, (last if n is None else n) + 1):
            yield self.read_layer(Stage.layer(k), head="load" if k == last else "skip")[0]

    def input_cache(self, stage: Stage, needed_by: Stage) -> ActivationCache:
        """acts_layer{k} as the input of `needed_by`: it must be complete."""
        if not self.paths.acts_manifest(stage.k).exists():
            raise ArtifactError(
                f"{needed_by.command} needs the activation cache {self.paths.acts_dir(stage.k)} "
                f"(no complete manifest.json): rerun {stage.command} to rebuild it"
            )
        return self.open_cache(stage)

    # ------------------------------------------------------------------ fusion and e2e
    def layer_shas(self) -> list | None:
        """sha256 of layer_1.pt .. layer_{L-m}.pt (None while one is missing): what a fused model was
        made of (layer_{L-m}.pt records the digest of the top segment it keeps beside it)."""
        paths = [self.paths.layer_ckpt(k) for k in range(1, self.run.layer_stages + 1)]
        return [self.sha256(p) for p in paths] if all(p.is_file() for p in paths) else None

    def fusion_complete(self) -> bool:
        shas = self.layer_shas()
        if shas is None:
            return False
        try:  # made by these settings from exactly these layer checkpoints
            _, meta = art.read_model_meta(
                self.paths.fused_dir,
                verify=self.run.verify,
                expect={"config_hash": self.hashes["fusion"], "layers_sha256": shas},
            )
        except ArtifactError:
            return False
        return self.run.fusion.finetune_steps == 0 or meta.get("finetuned", False)

    def e2e_complete(self) -> bool:
        try:
            art.read_model_meta(self.paths.e2e_dir, expect={"config_hash": self.hashes["e2e"]}, verify=self.run.verify)
        except ArtifactError:
            return False
        return True

    # ------------------------------------------------------------------ mid-stage checkpoints
    def resume_point(self, stage: Stage) -> Path | None:
        """ckpt/<stage>/last.ckpt when a killed run with these settings left a readable one, else None.

        The folder's stackwise.json (stage and config hash) is written before Lightning saves anything
        in it, so a checkpoint left by other settings is never resumed from: it stops the run (or is
        dropped with overwrite=true), like every other artifact of another config.
        """
        ckpt_dir = self.paths.stage_ckpt_dir(stage.name)
        tag = {"stage": stage.name, "config_hash": self.hashes[stage.hash_key]}
        last, tag_path = ckpt_dir / "last.ckpt", ckpt_dir / "stackwise.json"
        if last.exists():
            problem = self._resume_problem(last, tag_path, tag)
            if problem is None:
                log.info("stage %s: resuming from %s", stage.name, last)
                return last
            if not self.run.overwrite:
                raise ArtifactError(
                    f"{last} {problem}; use overwrite=true to restart stage {stage.name} from "
                    f"scratch, or name=NAME for a new folder"
                )
            log.warning("overwrite=true: dropping %s (%s)", last, problem)
            write_once(lambda: shutil.rmtree(ckpt_dir, ignore_errors=True))
        write_once(lambda: art.atomic_write_json(tag, tag_path))  # one rank writes, the others wait
        return None

    def _resume_problem(self, last: Path, tag_path: Path, tag: dict) -> str | None:
        try:
            have = json.loads(tag_path.read_text())
        except (OSError, ValueError):
            have = {}
        if not isinstance(have, dict) or have.get("config_hash") is None:
            return f"has no readable {tag_path.name} saying which settings made it"
        if have != tag:
            return (
                f"was made by config {str(have.get('config_hash'))[:12]} (stage {have.get('stage')}) but this "
                f"run's is {tag['config_hash'][:12]} (stage {tag['stage']})"
            )
        try:
            with zipfile.ZipFile(last) as z:  # the archive's directory sits at its end: truncation shows
                bad = z.testzip() if self.run.verify else None
        except (OSError, zipfile.BadZipFile) as e:
            return f"is not a readable checkpoint (truncated or corrupt: {e})"
        return None if bad is None else f"fails its CRC check at {bad!r} (corrupt)"

    def drop_resume_point(self, stage: Stage) -> None:
        """The optimizer state ends with the stage (one rank deletes it, the others wait)."""
        write_once(lambda: shutil.rmtree(self.paths.stage_ckpt_dir(stage.name), ignore_errors=True))
