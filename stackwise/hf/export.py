"""`export_model`: one model of an experiment folder as a transformers folder.

    <out>/config.json                       LlamaConfig (mha, gqa) or DeepseekV3Config (mla, dense layers)
    <out>/model.safetensors                 or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    <out>/tokenizer.json, tokenizer_config.json   the experiment's tokenizer (none for the dummy data)

`AutoModelForCausalLM.from_pretrained(out)` loads it offline with transformers' own classes. Only
safetensors are written. The folder is built under a temporary name beside `out` and renamed into
place, so an interrupted export leaves nothing that looks complete.

Host memory is bounded whatever the model's size: `ModelSource` reads the model folder (one file
or fused/'s shards) one tensor at a time, without building the model, and `write_shards` gathers
one output shard at a time, so about one shard (`max_shard_size`) plus one tensor is ever held.

The model was trained as a masked-diffusion denoiser: it predicts the tokens at [MASK] positions
and, unless `causal: true`, reads both sides. config.json's `stackwise` key says so, with the mask
and pad ids and the StackWise config; `stackwise.hf.bidirectional_mask` builds the 4-D mask that
makes transformers' causal classes attend both ways.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stackwise import artifacts as art
from stackwise.artifacts.atomic import fsync_dir, mode_kept, new_file, write_errors
from stackwise.config import load_run
from stackwise.errors import ArtifactError, StackWiseError
from stackwise.hf.adapter import StateDictAdapter, hf_model_type, require_transformers
from stackwise.hf.tokenizer import write_tokenizer
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Transformer

MODEL_CHOICES = ("fused", "finetuned", "e2e")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' names
EXPORT_FORMAT = "stackwise.hf_export"
BIDIRECTIONAL_HOWTO = (
    "bidirectional: it was trained to read both sides, and transformers' class is causal by default; pass "
    "attention_mask=stackwise.hf.bidirectional_mask(keep, dtype) or any (B, 1, T, T) float mask, 0 where a query "
    "may read a key (all zeros without padding): transformers uses a 4-D mask as it is"
)
CAUSAL_HOWTO = "causal: trained with the causal mask that transformers' class applies by default; nothing to pass"


@dataclass
class Exported:
    out: Path
    model: str  # fused | finetuned | e2e
    architecture: str
    files: list[str]
    tokenizer: str | None  # hf | byte | None (dummy data)


def pick_model(exp_dir: Path, which: str | None) -> tuple[str, Path]:
    """(`which`, its folder); None = the fine-tuned model when the experiment has one, else the fused one."""
    paths = art.ExperimentPaths(exp_dir)
    folders = {"fused": paths.fused_dir, "finetuned": paths.finetuned_dir, "e2e": paths.e2e_dir}
    if which is None:
        which = "finetuned" if (paths.finetuned_dir / "config.json").is_file() else "fused"
    if which not in folders:
        raise StackWiseError(f"unknown model {which!r}; allowed: {', '.join(MODEL_CHOICES)}")
    if not (folders[which] / "config.json").is_file():
        how = art.MODEL_COMMANDS[which]
        raise StackWiseError(f"{exp_dir} has no {which} model ({folders[which]} is missing or incomplete); run {how}")
    return which, folders[which]


def export_model(
    exp_dir: str | os.PathLike,
    out: str | os.PathLike,
    which: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> Exported:
    """Write model `which` of `exp_dir` (default: fine-tuned, else fused) to the transformers folder
    `out`. `dtype`: float32 | bfloat16 | float16 (default: the stored weights' own). The tensors are
    streamed: read one at a time from the model folder's safetensors files, renamed, cast and
    gathered into one output shard at a time (`write_shards`), so the host holds about one shard
    of `max_shard_size`, never the model. Raises StackWiseError (one line) for a bad folder or
    argument and for a model transformers has no class for."""
    exp_dir, out = Path(exp_dir), Path(out)
    if not exp_dir.is_dir():
        raise StackWiseError(f"experiment folder {exp_dir} does not exist")
    if dtype is not None and dtype not in DTYPES:
        raise StackWiseError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_out(out, overwrite)
    split_shards({}, max_shard_size)  # a bad size stops here, before any weight is read
    run = load_run(exp_dir)
    which, folder = pick_model(exp_dir, which)
    model_type = hf_model_type(run.model)  # a per-layer mix stops here, before any weight is read
    require_transformers()
    log(f"reading {folder}")
    source = ModelSource(folder)
    cfg = source.cfg
    hf_model_type(cfg)  # the folder's own config (the run's, unless it was changed by hand)
    adapter = StateDictAdapter(cfg)
    target = DTYPES[dtype] if dtype else source.dtype
    config = adapter.hf_config(
        max_position_embeddings=int(run.data.seq_len),
        torch_dtype=str(target).removeprefix("torch."),
        stackwise={
            "format": EXPORT_FORMAT,
            "experiment": exp_dir.name,
            "model": which,
            "objective": "masked diffusion: predicts the tokens at [MASK] positions (mask_token_id)",
            "mask_token_id": cfg.mask_id,
            "pad_token_id": cfg.pad_id,
            "causal": cfg.causal,
            "attention": CAUSAL_HOWTO if cfg.causal else BIDIRECTIONAL_HOWTO,
            **(
                {
                    "mla_latent_norm": f"StackWise's latent norms use norm_eps={cfg.norm_eps:g}, DeepSeek-V3's a fixed "
                    f"1e-6: q_a_proj and the latent rows of kv_a_proj_with_mqa are scaled by "
                    f"sqrt(1e-6 / norm_eps) = {adapter.latent_scale:.9g}, which gives the same numbers"
                }
                if model_type == "deepseek_v3" and adapter.latent_scale != 1.0
                else {}
            ),
            "config": cfg.to_dict(),
        },
    )
    with building(out, overwrite) as tmp, source:
        files = write_shards(source, adapter, target, tmp, max_shard_size, log)
        config.save_pretrained(str(tmp))
        tokenizer = write_tokenizer(run, tmp)
    return Exported(out, which, config.architectures[0], files, tokenizer)


class ModelSource:
    """A StackWise model folder (fused/, fused/finetuned/, e2e/; one file or sharded) read one tensor
    at a time, in the order of the model (embedding, layer 1 .. L, head), without building the model.

    `entries` lists every tensor the forward pass reads under its `full_state_dict` name, with its
    shape, checked against the folder's own config before any tensor is read; `read(name)` gives
    one: from the file that stores it (safetensors, memory-mapped: nothing else is loaded), or, for
    a frozen tensor (the SwiGLU up, MLA's q_b / kv_b under `mla_freeze_up`) that no file holds,
    regenerated from `(seed, k)` as `load_model` does. An imported layer's stored up-projection is
    read from the file like any other tensor."""

    def __init__(self, folder: Path):
        self.folder = folder
        config, _, files, aliases = art.model_files(folder)
        where = folder / "config.json"
        if not isinstance(config, dict):
            raise ArtifactError(f"{where} holds no model config; rerun the stage that writes it")
        self.cfg = ModelConfig.from_dict(config, prefix=f"{where}: model")
        self.stored: dict[str, tuple[Path, str, tuple[int, ...], str]] = {}  # name -> (file, key, shape, dtype)
        for path in files:
            self.stored.update(_header(path))
        for dup, src in aliases.items():
            if src not in self.stored:
                raise ArtifactError(f"{folder} ties {dup!r} to missing tensor {src!r}; rerun the stage that writes it")
            self.stored[dup] = self.stored[src]
        with torch.device("meta"):
            self.shapes = Transformer(self.cfg)
        self.entries = self._entries()
        self._files = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}

    def _entries(self) -> list[tuple[str, tuple[int, ...]]]:
        parts = [("embed.", self.shapes.embed.state_dict())]
        for i, block in enumerate(self.shapes.blocks):
            parts.append((f"blocks.{i}.", {**block.state_dict(), **block.frozen_tensors()}))
        parts.append(("head.", self.shapes.head.state_dict()))
        expected = {prefix + name: tuple(t.shape) for prefix, state in parts for name, t in state.items()}
        frozen = {f"blocks.{i}.{n}" for i, block in enumerate(self.shapes.blocks) for n in block.frozen_names}

        def misfit(what: str) -> ArtifactError:
            return ArtifactError(f"{self.folder}: the weights do not fit its config ({what})")

        for name, (_, _, shape, _) in self.stored.items():
            if name not in expected:
                raise misfit(f"unexpected tensor {name!r}")
            if shape != expected[name]:
                raise misfit(f"{name} has shape {shape}, the config needs {expected[name]}")
        missing = [n for n in expected if n not in self.stored and n not in frozen]
        if missing:
            raise misfit(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        return list(expected.items())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (the embedding's): what an export keeps by default."""
        return STORED_DTYPES.get(self.stored["embed.weight"][3], torch.float32)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.stored:
            return self._regenerated(name)
        path, key, _, _ = self.stored[name]
        if path not in self._open:
            self._open[path] = self._files.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        try:
            return self._open[path].get_tensor(key)
        except Exception as e:
            raise ArtifactError(
                f"{path}: tensor {key!r} is not readable (truncated or corrupt: {type(e).__name__}: "
                f"{art.one_line(e, 120)}); rerun the stage that writes it"
            ) from None

    def _regenerated(self, name: str) -> torch.Tensor:
        """A frozen tensor drawn from `(seed, k)` alone: a block built on the meta device is told that
        its other frozen tensors are stored (`keep_frozen`), so `frozen_values` draws this one only."""
        i, local = name.split(".", 2)[1:]
        with torch.device("meta"):
            block = Block(self.cfg, int(i) + 1)
        block.keep_frozen({n: block.get_buffer(n) for n in block.frozen_names if n != local})
        return block.frozen_values()[local]

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._files.close()
        self._open.clear()


def _header(path: Path) -> dict[str, tuple[Path, str, tuple[int, ...], str]]:
    """{name: (file, name, shape, safetensors dtype)} of one safetensors file, from its header alone."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {
                key: (path, key, tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                for key in f.keys()  # noqa: SIM118 (safe_open is not iterable)
            }
    except Exception as e:
        raise ArtifactError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {art.one_line(e, 120)}); "
            f"rerun the stage that writes it"
        ) from None


def write_shards(
    source: ModelSource,
    adapter: StateDictAdapter,
    dtype: torch.dtype,
    folder: Path,
    max_shard_size: int | str,
    log: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """The model's tensors as safetensors shards named as transformers' save_pretrained names them
    (one model.safetensors when it fits in one), split by huggingface_hub's own helper from the
    shapes alone, then filled one shard at a time: each tensor read, renamed, cast to `dtype`, and
    the shard written under a temporary name and renamed once complete; the index is written last.
    The host holds one shard (at most `max_shard_size`, or one tensor larger than that) plus the
    tensor being read."""
    names = {adapter.name_to_hf(name): name for name, _ in source.entries}  # transformers name -> ours
    shapes = dict(source.entries)
    split = split_shards(
        {hf: torch.empty(shapes[ours], dtype=dtype, device="meta") for hf, ours in names.items()}, max_shard_size
    )
    n = len(split.filename_to_tensors)
    for i, (filename, tensors) in enumerate(split.filename_to_tensors.items(), start=1):
        shard = {}
        for hf in tensors:
            shard[hf] = adapter.tensor_to_hf(names[hf], source.read(names[hf]).to(dtype))[1].contiguous()
        part = folder / f".{filename}.partial"
        with write_errors(part), mode_kept(new_file(part)):  # the umask's permissions, not safetensors' 0600
            save_file(shard, str(part), metadata={"format": "pt"})
        del shard  # before the next shard is gathered: one shard at a time
        part.rename(folder / filename)
        log(f"wrote {filename} ({i}/{n})")
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        art.atomic_write_json(index, folder / "model.safetensors.index.json")
        files.append("model.safetensors.index.json")
    return files


def split_shards(state: dict[str, torch.Tensor], max_shard_size: int | str):
    from huggingface_hub import split_torch_state_dict_into_shards  # a dependency of tokenizers and transformers

    try:
        return split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    except ValueError as e:
        raise StackWiseError(f"--max-shard-size {max_shard_size!r}: {e}") from None


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StackWiseError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StackWiseError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def building(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds (removed otherwise);
    an existing `out` is replaced only then."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out.exists():
            check_out(out, overwrite)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
