"""`export_model`: one model of an experiment folder as a transformers folder.

    <out>/config.json                       LlamaConfig (mha, gqa) or DeepseekV3Config (mla, dense layers)
    <out>/model.safetensors                 or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    <out>/tokenizer.json, tokenizer_config.json   the experiment's tokenizer (none for the dummy data)

`AutoModelForCausalLM.from_pretrained(out)` loads it offline with transformers' own classes. Only
safetensors are written. The folder is built under a temporary name beside `out` and renamed into
place, so an interrupted export leaves nothing that looks complete.

The model was trained as a masked-diffusion denoiser: it predicts the tokens at [MASK] positions
and, unless `causal: true`, reads both sides. config.json's `stackwise` key says so, with the mask
and pad ids and the StackWise config; `stackwise.hf.bidirectional_mask` builds the 4-D mask that
makes transformers' causal classes attend both ways.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from stackwise import artifacts as art
from stackwise.artifacts.atomic import fsync_dir, write_errors
from stackwise.config import load_run
from stackwise.errors import StackWiseError
from stackwise.hf.adapter import StateDictAdapter, full_state_dict, hf_model_type, require_transformers
from stackwise.hf.tokenizer import write_tokenizer

MODEL_CHOICES = ("fused", "finetuned", "e2e")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
        how = {
            "fused": "stackwise-train (stage=all, or stage=fusion after the layer stages)",
            "finetuned": "stackwise-train with fusion.finetune_steps > 0",
            "e2e": "stackwise-train stage=e2e",
        }[which]
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
    `out`. `dtype`: float32 | bfloat16 | float16 (default: the weights' own). Raises StackWiseError
    (one line) for a bad folder or argument and for a model transformers has no class for."""
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
    model, _ = art.load_model(folder)
    cfg = model.cfg
    adapter = StateDictAdapter(cfg)
    state = adapter.to_hf(full_state_dict(model))
    del model
    target = DTYPES[dtype] if dtype else next(iter(state.values())).dtype
    state = {name: t.detach().to("cpu", target).contiguous() for name, t in state.items()}
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
    with building(out, overwrite) as tmp:
        files = write_weights(state, tmp, max_shard_size)
        config.save_pretrained(str(tmp))
        tokenizer = write_tokenizer(run, tmp)
    return Exported(out, which, config.architectures[0], files, tokenizer)


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> list[str]:
    """safetensors shards as transformers' save_pretrained names them (one model.safetensors when it
    fits in one), split by huggingface_hub's own helper, with the index beside them when sharded."""
    split = split_shards(state, max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        with write_errors(folder / filename):
            save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
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
