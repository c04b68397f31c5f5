"""`stackwise-export`: an experiment's model as a Hugging Face transformers folder.

    stackwise-export outputs/default --out hf/default                   # fine-tuned model, else the fused one
    stackwise-export outputs/default --out hf/e2e --model e2e --dtype bfloat16
    stackwise-export outputs/big --out hf/big --max-shard-size 2GB      # sharded, with model.safetensors.index.json

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)` (LlamaForCausalLM for mha/gqa,
DeepseekV3ForCausalLM with dense layers for mla), safetensors only, with the experiment's tokenizer.
A bidirectional model (the default) needs a 4-D attention mask: see config.json's `stackwise` key.
The weights are streamed, one tensor in and one shard out at a time: host memory holds about one
--max-shard-size shard, never the model.
Exit status 2 with one line for a bad folder or argument, or a model with a per-layer mix of kinds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stackwise.cli.common import doc_parser, user_errors

PROG = "stackwise-export"


def _parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("experiment", type=Path, help="an experiment folder, e.g. outputs/default")
    p.add_argument("--out", type=Path, required=True, help="the transformers folder to write")
    p.add_argument(
        "--model",
        choices=("fused", "finetuned", "e2e"),
        default=None,
        help="which model (default: finetuned when the experiment has one, else fused)",
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="(default: the weights' own)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 2GB (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors(PROG, debug=args.debug):
        from stackwise.hf.export import export_model  # imports torch: keep --help and argument errors instant

        done = export_model(
            args.experiment,
            args.out,
            which=args.model,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    tokenizer = {"hf": "its tokenizer", "byte": "the byte tokenizer", None: "no tokenizer (dummy data)"}
    print(
        f"wrote {done.out}: {done.model} model as {done.architecture}, {', '.join(done.files)}, "
        f"{tokenizer[done.tokenizer]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
