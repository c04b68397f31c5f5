"""`import_llama`: start a StackWise experiment from a local Hugging Face Llama folder.

    layers=0   its embeddings (and final norm, untied lm_head): stage 1 starts from them instead of
               its (seed, ...) init and trains embeddings + layer 1 as usual
    layers=K   its embeddings and layers 1..K as finished stages: layers/layer_1.pt .. layer_K.pt,
               each with its validation scores (taken as a trained stage's are), then their
               activation caches, so `stage=layer k=K+1` continues; K = n_layers imports the whole
               model, and `stage=fusion` fuses it at once (its check compares with layer K's scores)

The StackWise model takes the Llama's sizes (d_model, heads, d_ff, rope_theta, rms eps, tied head,
vocabulary); `model.n_layers` is the Llama's unless given (deeper or shallower, >= K). What StackWise
has and a Llama lacks:
- the SwiGLU up-projection is frozen in StackWise and, for a layer it trains, a random matrix
  regenerated from (seed, k). An imported layer keeps its trained up-projection instead, stored in
  its layer file as a frozen weight (`Block.keep_frozen`): it is never trained, and it is in fused/
  and in an export. Layers StackWise trains after it get their own (seed, k) up-projection.
- [MASK] and [PAD] ids: the data's tokenizer (the folder's tokenizer.json unless `data.tokenizer.*`
  or data=dummy is given) adds them when it lacks them; rows past the Llama's vocabulary start as
  the mean of its embedding (and lm_head) rows.
- a bidirectional objective: the imported layers were trained causally; `model.causal=true` keeps
  them causal, the default (bidirectional) continues them as a masked-diffusion denoiser.
Every weight is read from safetensors (a folder with only pickle weights is refused: opening one can
run code). Refused with one line: a model other than Llama, biases, an activation other than SiLU,
RoPE scaling (Llama-3.1's `llama3` type...), sizes given on the command line that differ from the folder's.

`import.json` in the experiment folder records the source and the command that continues it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open
from torch import Tensor

from stackwise import artifacts as art
from stackwise import identity
from stackwise.config import CONFIG_MODULE, RunConfig, register_configs
from stackwise.config.compose import user_error
from stackwise.config.run import check_output_dir
from stackwise.errors import ArtifactError, ConfigError, StackWiseError
from stackwise.hf.adapter import StateDictAdapter, require_transformers
from stackwise.model.transformer import Block, Embedding, Head, empty
from stackwise.model.weights import LayerModules, LayerWeights

# model settings the folder decides: a command line may not change them
FROM_FOLDER = ("d_model", "n_heads", "n_kv_heads", "d_ff", "attention", "rope_theta", "norm_eps", "tie_embeddings")


@dataclass
class LlamaFolder:
    """A local transformers Llama folder: its config and where each tensor is."""

    folder: Path
    config: Any  # transformers.LlamaConfig
    where: dict[str, Path]  # tensor name -> safetensors file

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def tensors(self, keep: Callable[[str], bool]) -> dict[str, Tensor]:
        """The tensors whose names `keep` accepts, read from their files (nothing else is read)."""
        by_file: dict[Path, list[str]] = {}
        for name, path in self.where.items():
            if keep(name):
                by_file.setdefault(path, []).append(name)
        out: dict[str, Tensor] = {}
        for path, names in by_file.items():
            out.update(_read(path, names))
        return out


def _read(path: Path, names: list[str]) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({art.one_line(e, 120)})") from None


def read_llama_folder(folder: str | Path) -> LlamaFolder:
    """Check that `folder` is a Llama StackWise can take as it is; ArtifactError (one line) otherwise."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{folder} is not a Hugging Face model folder (no config.json)")
    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ArtifactError(f"{folder}/config.json is not a transformers config ({art.one_line(e, 160)})") from None
    if config.model_type != "llama":
        raise ArtifactError(
            f"{folder} holds a {config.model_type!r} model; stackwise-import reads Llama folders (model_type llama)"
        )
    theta, rope_type = rope_of(config)
    problems = [
        (
            getattr(config, "hidden_act", "silu") != "silu",
            f"hidden_act {config.hidden_act!r} (StackWise's MLP is SwiGLU)",
        ),
        (getattr(config, "attention_bias", False), "attention_bias true (StackWise has no biases)"),
        (getattr(config, "mlp_bias", False), "mlp_bias true (StackWise has no biases)"),
        (rope_type != "default", f"RoPE type {rope_type!r} (StackWise's RoPE is the plain one, rope_theta only)"),
        (
            getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads),
            f"head_dim {getattr(config, 'head_dim', None)} != hidden_size / num_attention_heads",
        ),
        (theta is None, "no rope_theta"),
    ]
    for bad, what in problems:
        if bad:
            raise ArtifactError(f"{folder}: {what}; stackwise-import cannot reproduce this model")
    return LlamaFolder(folder, config, _weight_files(folder))


def rope_of(config: Any) -> tuple[float | None, str]:
    """(rope_theta, rope type) in transformers 4 (rope_theta, rope_scaling) and 5 (rope_parameters) alike."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return theta, params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"


def _weight_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{index} is not a safetensors index ({art.one_line(e, 120)})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt", device="cpu") as f:
                return dict.fromkeys(f.keys(), single)
        except Exception as e:
            raise ArtifactError(f"{single} is not a readable safetensors file ({art.one_line(e, 120)})") from None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ArtifactError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); stackwise-import reads safetensors, since "
            f"opening a pickle can run code: save the model with save_pretrained(DIR, safe_serialization=True)"
        )
    raise ArtifactError(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")


# ---------------------------------------------------------------------------- the experiment's config
def folder_settings(hf: LlamaFolder) -> dict[str, Any]:
    """The model settings the folder decides (`model.<key>`: value)."""
    c = hf.config
    heads, kv = int(c.num_attention_heads), int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    return {
        "d_model": int(c.hidden_size),
        "n_heads": heads,
        "n_kv_heads": kv,
        "d_ff": int(c.intermediate_size),
        "attention": "mha" if kv == heads else "gqa",
        "rope_theta": float(rope_of(c)[0]),
        "norm_eps": float(c.rms_norm_eps),
        "tie_embeddings": bool(c.tie_word_embeddings),
    }


def _override(key: str, value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)
    return f"{key}={text}"


def _compose(overrides: Sequence[str]) -> RunConfig:
    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise user_error(e) from None
    run = RunConfig.from_hydra(cfg, list(overrides))
    check_output_dir(Path(run.output_root).expanduser(), "output_root")
    return run


def import_overrides(hf: LlamaFolder, layers: int, user: Sequence[str]) -> tuple[RunConfig, list[str]]:
    """The RunConfig of the imported experiment and the overrides that compose it (the folder's model
    settings first, then the user's): `stackwise-train` with these overrides continues it."""
    parsed = OverridesParser.create().parse_overrides(list(user))
    given = {o.key_or_group for o in parsed}
    for key in given:
        if key in ("stage", "k"):
            raise ConfigError(
                key, "stackwise-import runs the imported stages only; continue with the command it prints"
            )
        if key in ("model", "attention") or key.removeprefix("model.") in (*FROM_FOLDER, "vocab_size"):
            raise ConfigError(
                key,
                f"is {hf.folder}'s: stackwise-import takes the model's sizes from the folder (set model.n_layers, "
                "model.causal, model.dropout... individually)",
            )
    ours = [_override(f"model.{k}", v) for k, v in folder_settings(hf).items()]
    if "model.n_layers" not in given:
        ours.append(_override("model.n_layers", hf.n_layers))
    if "model.init_std" not in given:  # how the layers StackWise adds start: as the Llama's did
        ours.append(_override("model.init_std", float(getattr(hf.config, "initializer_range", 0.02))))
    if "name" not in given:
        mine = identity.folder_name(None, [o.input_line for o in parsed])
        name = f"import-{hf.folder.resolve().name}-k{layers}" + ("" if mine == "default" else f",{mine}")
        name = re.sub(r"[^\w.,=+-]+", "_", name)
        ours.append(f"name='{name}'")  # quoted: a Hydra value may not hold the overrides' , and = bare
    run = _compose([*ours, *user])
    tokenizer = hf.folder / "tokenizer.json"
    if run.data.name != "dummy" and tokenizer.is_file() and not any(k.startswith("data.tokenizer") for k in given):
        ours += ["data.tokenizer.kind=hf", f"data.tokenizer.path={tokenizer.resolve()}"]
        run = _compose([*ours, *user])
    hf_vocab = int(hf.config.vocab_size)
    if run.model.vocab_size < hf_vocab:  # the tokenizer's ids fit: keep every row of the Llama
        ours.append(_override("model.vocab_size", hf_vocab))
        run = _compose([*ours, *user])
    if not 0 <= layers <= min(run.model.n_layers, hf.n_layers):
        raise ConfigError(
            "layers",
            f"must be in 0..{min(hf.n_layers, run.model.n_layers)} (the folder has {hf.n_layers} layers, the "
            f"experiment model.n_layers={run.model.n_layers}), got {layers}",
        )
    return run, [*ours, *user]


def _shell(arg: str) -> str:
    """`arg` as a shell word: bare when it can be, else in double quotes (a Hydra value's own single quotes stay)."""
    if shlex.quote(arg) == arg:
        return arg
    return f'"{arg}"' if not set(arg) & set('"$`\\!') else shlex.quote(arg)


# ---------------------------------------------------------------------------- the weights
def _rows(t: Tensor, n: int) -> Tensor:
    """`t (V, D)` with rows up to n: the new rows (ids the Llama never had: [MASK], [PAD]) start at the mean row."""
    if t.shape[0] >= n:
        return t
    return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(n - t.shape[0], -1)])


class ImportedWeights:
    """The Llama's tensors under StackWise's names (`full_state_dict` names: a block's up-projection
    included), read when needed: the embedding, final norm and untied head once (`common`), a layer's
    only when its stage is written (`state(k)`), so the host holds those and one layer, never the model."""

    def __init__(self, hf: LlamaFolder, run: RunConfig):
        self.hf, self.cfg = hf, run.model
        self.adapter = StateDictAdapter(self.cfg)

        def needed(name: str) -> bool:
            return not name.startswith("model.layers.") and (name != "lm_head.weight" or not self.cfg.tie_embeddings)

        state = self.adapter.from_hf(hf.tensors(needed), n_layers=0)
        state["embed.weight"] = _rows(state["embed.weight"], self.cfg.vocab_size)
        if "head.proj.weight" in state:
            state["head.proj.weight"] = _rows(state["head.proj.weight"], self.cfg.vocab_size)
        self.common = state

    def state(self, k: int) -> dict[str, Tensor]:
        """`common` and layer k's tensors."""
        layer = self.hf.tensors(lambda name: name.startswith(f"model.layers.{k - 1}."))
        return {**self.common, **self.adapter.from_hf(layer, n_layers=k)}


def _load(module: torch.nn.Module, state: dict[str, Tensor], what: str, source: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{source}: {what} does not fit the model ({art.one_line(e, 200)})") from None


def start_modules(run: RunConfig, state: dict[str, Tensor], k: int, source: Path) -> LayerModules:
    """Layer k's modules holding the imported weights (the embedding in layer 1's): the block keeps its
    up-projection as a stored frozen weight (`Block.keep_frozen`, through load_state_dict)."""
    cfg = run.model
    # built on the meta device, given storage, then filled: nothing is drawn only to be overwritten
    head = empty(lambda: Head(cfg))
    _load(head, {n.removeprefix("head."): t for n, t in state.items() if n.startswith("head.")}, "the head", source)
    embed = None
    if k == 1:
        embed = empty(lambda: Embedding(cfg))
        _load(embed, {"weight": state["embed.weight"]}, "the embedding", source)
    block = empty(lambda: Block(cfg, k))
    prefix = f"blocks.{k - 1}."
    imported = {n.removeprefix(prefix): t for n, t in state.items() if n.startswith(prefix)}
    if imported:
        _load(block, imported, f"layer {k}", source)
    else:  # layers=0 imports no block: stage 1 starts its own (seed, 1) draw
        block.init_weights()
    return LayerModules(block, head, embed)


# ---------------------------------------------------------------------------- the experiment
@dataclass
class Imported:
    run: RunConfig
    layers: int
    command: str  # the stackwise-train command that continues the experiment


def import_llama(
    folder: str | Path, layers: int, overrides: Sequence[str] = (), log: Callable[[str], None] = lambda _: None
) -> Imported:
    """Start the experiment (see the module docstring); safe to run again: finished stages are kept."""
    from stackwise.lock import experiment_lock
    from stackwise.pipeline import Pipeline, Stage  # imports Lightning
    from stackwise.pipeline.state import ExperimentState, cache_root

    hf = read_llama_folder(folder)
    run, args = import_overrides(hf, layers, overrides)
    weights = ImportedWeights(hf, run)
    paths = art.ExperimentPaths(run.exp_dir, acts_root=cache_root(run))
    exp = ExperimentState(run, paths, run.hashes())
    cont = max(layers, 1) + 1
    next_stage = f"stage=layer k={cont}" if cont <= run.model.n_layers else "stage=fusion"
    command = " ".join(_shell(a) for a in ["stackwise-train", *args]) + f" {next_stage}   # or stage=all"
    exp.create()
    with experiment_lock(paths):
        exp.adopt(run.to_dict())
        art.atomic_write_json(
            {"source": str(hf.folder.resolve()), "layers": layers, "overrides": args, "continue": command},
            paths.import_json,
        )

    class ImportedStart(Pipeline):
        def start_layer(self, stage, below):
            modules = super().start_layer(stage, below)
            if stage.first:  # only when stage 1 trains: layers=0
                imported = start_modules(run, weights.common, 1, hf.folder)
                modules.embed.load_state_dict(imported.embed.state_dict())
                modules.head.load_state_dict(imported.head.state_dict())
            return modules

        def score(self, stage, modules: LayerModules) -> dict[str, float]:
            """The imported layer's validation scores, as a trained stage's are taken: on the same
            validation rows (acts_layer{k-1}'s, or the tokens for layer 1). Fusion checks the fused
            model against the last layer's, so an experiment imported whole (K = n_layers) fuses at once."""
            from stackwise.stages.layerwise import LayerwiseStage

            data, _, embed_weight, prefix = self.layer_inputs(stage, below_head="if_present")
            optim, steps = self.run.optim_for(stage.budget), self.run.max_steps(stage.budget)
            weighting = self.run.masking.weighting
            module = LayerwiseStage(self.cfg, modules, optim, weighting, steps, stage.name, embed_weight, prefix)
            return self.trainers.validate(module, data.val_dataloader())

    for k in range(1, max(layers, 1) + 1):  # layers=0: stage 1 trains; else the imported layers' caches
        pipeline = ImportedStart(
            dataclasses.replace(run, stage="embed" if k == 1 else "layer", k=None if k == 1 else k)
        )
        if k <= layers:  # each layer written just before its cache: an untied head is kept for the latest only
            modules = start_modules(run, weights.state(k), k, hf.folder)
            with experiment_lock(paths):
                write_layer(run, exp, Stage.layer(k), modules, hf.folder, log, partial(pipeline.score, Stage.layer(k)))
        log(f"stage {Stage.layer(k).name}: {'caching' if k <= layers else 'training from the imported embeddings'}")
        pipeline.execute()
    return Imported(run, layers, command)


def write_layer(
    run: RunConfig,
    exp: Any,
    stage: Any,
    modules: LayerModules,
    source: Path,
    log,
    score: Callable[[LayerModules], dict[str, float]],
) -> None:
    """layers/layer_k.pt as a finished stage, with its validation scores (`score`, as a trained
    stage records them): kept when the file there holds the same weights."""
    path = exp.paths.layer_ckpt(stage.k)
    weights = LayerWeights.of(modules)
    if path.exists():
        try:
            # if_present: a later imported layer holds the untied head now (one is kept: the latest)
            have, _ = art.load_layer_checkpoint(path, expect=exp.layer_expect(stage), head="if_present")
        except ArtifactError:
            have = None
        same = have is not None and all(
            set(have.sections().get(m, {})) <= set(s)
            and art.state_digest(have.sections().get(m, {}))
            == art.state_digest({n: t for n, t in s.items() if n in have.sections().get(m, {})})
            for m, s in weights.sections().items()
        )
        if same:
            log(f"{path.name}: already imported")
            return
        if not run.overwrite:
            raise StackWiseError(f"{path} exists with other weights; use overwrite=true to replace it, or name=NAME")
    below = exp.paths.layer_ckpt(stage.k - 1) if stage.k > 1 else None
    meta = {
        "stage": stage.name,
        "k": stage.k,
        "config_hash": exp.hashes["layer"],
        "model": run.model.to_dict(),
        "prev_sha256": exp.sha256(below) if below is not None else None,
        **score(modules),
        "steps": 0,
        "tokens": 0,
        "imported": {"from": str(source.resolve()), "layer": stage.k},
    }
    art.save_layer_checkpoint(path, weights, meta)
    log(f"{path.name}: imported layer {stage.k}")
