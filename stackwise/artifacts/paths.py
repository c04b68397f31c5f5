"""`ExperimentPaths`: every file name of an experiment folder (the layout is in stackwise/artifacts/__init__.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from stackwise.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]


class ExperimentPaths:
    """Every path of one experiment, derived from its folder; nothing is created on construction."""

    def __init__(self, exp_dir: PathLike, acts_root: PathLike | None = None):
        self.root = Path(exp_dir)
        # where the activation caches live: acts/ here, or a RAM-backed folder (cache.store=memory)
        self._acts_root = None if acts_root is None else Path(acts_root)

    @classmethod
    def from_root(cls, output_root: PathLike, experiment: str) -> ExperimentPaths:
        """`<output_root>/<experiment>/`: a stable folder, so stage k finds what stage k-1 wrote."""
        if not experiment or "/" in experiment or experiment in (".", ".."):
            raise ConfigError("experiment", f"must be a plain folder name, got {experiment!r}")
        return cls(Path(output_root) / experiment)

    def __repr__(self) -> str:
        return f"ExperimentPaths({str(self.root)!r})"

    # -- layer-wise checkpoints
    @property
    def layers_dir(self) -> Path:
        return self.root / "layers"

    def layer_ckpt(self, k: int) -> Path:
        """`layers/layer_{k}.pt`, k 1-based."""
        return self.layers_dir / f"layer_{_check_k(k)}.pt"

    def head_file(self, k: int) -> Path:
        """`layers/layer_{k}.head.safetensors`: the untied output projection stage k trained (only
        the latest stage's is kept; a tied model has none)."""
        return untied_head_path(self.layer_ckpt(k))

    def top_file(self, k: int) -> Path:
        """`layers/layer_{k}.top.safetensors`: the top segment stage k trained (layerwise.top_layers > 0;
        only the latest stage's is kept)."""
        return top_segment_path(self.layer_ckpt(k))

    def existing_layers(self) -> list[int]:
        """The k of every `layers/layer_{k}.pt` present, sorted (presence only: not validated)."""
        if not self.layers_dir.is_dir():
            return []
        ks = []
        for p in self.layers_dir.glob("layer_*.pt"):
            stem = p.stem[len("layer_") :]
            if stem.isdigit() and int(stem) >= 1:
                ks.append(int(stem))
        return sorted(ks)

    # -- activation caches
    @property
    def acts_root(self) -> Path:
        return self._acts_root if self._acts_root is not None else self.root / "acts"

    def acts_dir(self, k: int) -> Path:
        """`acts/acts_layer{k}/`: the hidden states after layer k, per cached example."""
        return self.acts_root / f"acts_layer{_check_k(k)}"

    def acts_manifest(self, k: int) -> Path:
        """`acts/acts_layer{k}/manifest.json`: written last; its presence marks the cache complete."""
        return manifest_path(self.acts_dir(k))

    @property
    def store_choice(self) -> Path:
        """`cache_store.json`: the store `cache.store=auto` chose for this folder (kept, so that a resumed
        run and every DDP rank use the same one; delete it to choose again)."""
        return self.root / "cache_store.json"

    # -- fused and end-to-end models
    @property
    def fused_dir(self) -> Path:
        return self.root / "fused"

    @property
    def fused_weights(self) -> Path:
        return self.fused_dir / "model.safetensors"

    @property
    def finetuned_dir(self) -> Path:
        """`fused/finetuned/` (model.safetensors + config.json): the jointly fine-tuned fused model.

        A folder of its own rather than `fused/finetuned.safetensors`, so it is complete or not
        by the same rule as every model folder (config.json written last).
        """
        return self.fused_dir / "finetuned"

    @property
    def fused_config(self) -> Path:
        return self.fused_dir / "config.json"

    @property
    def e2e_dir(self) -> Path:
        return self.root / "e2e"

    @property
    def e2e_weights(self) -> Path:
        return self.e2e_dir / "model.safetensors"

    @property
    def e2e_config(self) -> Path:
        return self.e2e_dir / "config.json"

    # -- Lightning, logging, data, summaries
    @property
    def ckpt_root(self) -> Path:
        return self.root / "ckpt"

    def stage_ckpt_dir(self, stage_name: str) -> Path:
        """`ckpt/<stage_name>/` for Lightning's ModelCheckpoint (e.g. `ckpt/layer_3/`)."""
        if not stage_name or "/" in stage_name or stage_name in (".", ".."):
            raise ValueError(f"stage name must be a plain folder name, got {stage_name!r}")
        return self.ckpt_root / stage_name

    def stage_last_ckpt(self, stage_name: str) -> Path:
        """`ckpt/<stage_name>/last.ckpt`: what a mid-stage resume starts from."""
        return self.stage_ckpt_dir(stage_name) / "last.ckpt"

    @property
    def tb_dir(self) -> Path:
        return self.root / "tb"

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    @property
    def run_config(self) -> Path:
        """The resolved config of the latest run (what eval / generate / report rebuild it from)."""
        return self.root / "run_config.json"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def import_json(self) -> Path:
        """`import.json`: what stackwise-import started the experiment from (absent otherwise)."""
        return self.root / "import.json"

    @property
    def eval_json(self) -> Path:
        """stackwise-eval's report (the default of its --json)."""
        return self.root / "eval.json"

    @property
    def hydra_dir(self) -> Path:
        return self.root / "hydra"

    @property
    def lock_file(self) -> Path:
        """`run.lock`: the run that writes here holds an OS lock on it (the file itself stays)."""
        return self.root / "run.lock"


def untied_head_path(layer_ckpt: PathLike) -> Path:
    """Where a layer checkpoint keeps its untied output projection: beside it, `<stem>.head.safetensors`."""
    p = Path(layer_ckpt)
    return p.with_name(f"{p.stem}.head.safetensors")


def top_segment_path(layer_ckpt: PathLike) -> Path:
    """Where a layer checkpoint keeps its top segment: beside it, `<stem>.top.safetensors`."""
    p = Path(layer_ckpt)
    return p.with_name(f"{p.stem}.top.safetensors")


def manifest_path(acts_dir: PathLike) -> Path:
    """The manifest of one activation cache folder."""
    return Path(acts_dir) / "manifest.json"


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("k", f"layer index must be an integer >= 1 (1-based), got {k!r}")
    return k


# the command that writes each model folder of an experiment: what a reader that finds none names
MODEL_COMMANDS = {
    "fused": "stackwise-train (stage=all, or stage=fusion after the layer stages)",
    "finetuned": "stackwise-train with fusion.finetune_steps > 0",
    "e2e": "stackwise-train stage=e2e",
}
