"""Which models an experiment folder holds, and the loaders that build their scorers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stackwise import artifacts as art
from stackwise.errors import ArtifactError
from stackwise.evaluation.scorers import PrefixStack, Scorer, WholeModel
from stackwise.model.config import ModelConfig
from stackwise.model.weights import LayerWeights


@dataclass
class ModelEntry:
    name: str
    kind: str  # prefix | fused | finetuned | e2e
    depth: int
    recorded_val_loss: float | None = None


def _model_config(d: Any, source: Path, run_cfg: ModelConfig) -> ModelConfig:
    """A layer checkpoint's recorded model config (the experiment's when it records none), checked by `_belongs`."""
    if not isinstance(d, dict):
        return run_cfg
    return belongs(ModelConfig.from_dict(d, prefix=f"{source}: model"), source, run_cfg)


def belongs(cfg: ModelConfig, source: Path, run_cfg: ModelConfig) -> ModelConfig:
    """A model of this experiment shares its data's vocabulary and special ids."""
    for key in ("vocab_size", "mask_id", "pad_id"):
        if getattr(cfg, key) != getattr(run_cfg, key):
            raise ArtifactError(
                f"{source} has {key}={getattr(cfg, key)} but the experiment's data has "
                f"{getattr(run_cfg, key)}: it does not belong to this experiment"
            )
    return cfg


def layer_stack(
    paths: art.ExperimentPaths, run_cfg: ModelConfig, warnings: list[str]
) -> tuple[ModelConfig | None, list[tuple[LayerWeights, dict]]]:
    """The layer checkpoints 1..K that form one consistent stack (K may be 0)."""
    present = paths.existing_layers()
    states: list[tuple[LayerWeights, dict]] = []
    cfg: ModelConfig | None = None
    for k in present:
        if k != len(states) + 1:
            warnings.append(f"{paths.layer_ckpt(k)} skipped: {paths.layer_ckpt(len(states) + 1)} is missing")
            break
        path = paths.layer_ckpt(k)
        weights, meta = art.load_layer_checkpoint(path)
        if meta.get("k") not in (None, k):
            raise ArtifactError(f"{path} says it is layer {meta.get('k')}, not {k}")
        if states and meta.get("prev_sha256") and meta["prev_sha256"] != art.sha256_file(paths.layer_ckpt(k - 1)):
            warnings.append(
                f"{path} skipped: it was trained on another {paths.layer_ckpt(k - 1).name} than the one "
                "present (rerun its stage)"
            )
            break
        k_cfg = _model_config(meta.get("model"), path, run_cfg)
        if cfg is not None and k_cfg != cfg:
            warnings.append(f"{path} skipped: its model config differs from layer 1's")
            break
        cfg = k_cfg
        states.append((weights, meta))
    return cfg, states


def discover(
    paths: art.ExperimentPaths, run_cfg: ModelConfig, warnings: list[str]
) -> list[tuple[list[ModelEntry], Callable[[], Scorer]]]:
    """Every model of the experiment: [(the entries one scorer evaluates, a loader building it)].

    Layer checkpoints are read here (the prefix stack needs them all anyway); the safetensors
    models are read by their loaders, one at a time.
    """
    cfg, states = layer_stack(paths, run_cfg, warnings)
    groups: list[tuple[list[ModelEntry], Callable[[], Scorer]]] = []
    if any(weights.top for weights, _ in states):  # layerwise.top_layers > 0
        warnings.append(
            "depth prefixes skipped: each stage read out through a top segment (layerwise.top_layers) that only "
            "the latest stage keeps; results.json records every stage's validation loss"
        )
        states = []
    if states:
        entries = [
            ModelEntry(f"depth_{k}", "prefix", k, meta.get("val_loss")) for k, (_, meta) in enumerate(states, start=1)
        ]
        groups.append((entries, lambda: PrefixStack(cfg, [weights for weights, _ in states])))
    complete = paths.fused_config.name  # a model folder is complete once its config.json exists
    for name, folder in (("fused", paths.fused_dir), ("finetuned", paths.finetuned_dir), ("e2e", paths.e2e_dir)):
        if not folder.is_dir():
            continue
        if not (folder / complete).is_file():
            warnings.append(f"{folder} skipped: incomplete (no {complete}; its stage did not finish)")
            continue
        entry = ModelEntry(name, name, run_cfg.n_layers)

        def load(name=name, folder=folder, entry=entry) -> Scorer:
            model, meta = art.load_model(folder)
            belongs(model.cfg, folder, run_cfg)
            entry.depth, entry.recorded_val_loss = model.cfg.n_layers, meta.get("val_loss")
            return WholeModel(name, model)

        groups.append(([entry], load))
    return groups
