"""`stackwise-import`: start a StackWise experiment from a local Hugging Face Llama folder.

    stackwise-import ~/models/llama-tiny                       # its embeddings: stage 1 starts from them
    stackwise-import ~/models/llama-tiny --layers 2 data=shakespeare trainer.max_steps=200
    stackwise-import ~/models/llama-tiny --layers 2 model.n_layers=8 name=deeper output_root=/data/runs
    stackwise-import ~/models/llama-tiny --layers 4 model.causal=true      # all 4 layers: stage=fusion next

--layers K takes its embeddings and layers 1..K as finished stages (their activation caches are
built), so layer-wise training continues at layer K+1; K = model.n_layers takes every layer, and
stage=fusion (or stackwise-eval after it) runs at once; --layers 0 (the default) trains stage 1 from
its embeddings. The model's sizes come from the folder; any other stackwise-train override may
follow. It prints the stackwise-train command that continues the experiment (also in import.json).
Exit status 2 with one line for a folder StackWise cannot reproduce or a bad argument.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stackwise.cli.common import doc_parser, quiet_known_advice, user_errors

PROG = "stackwise-import"


def _parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("folder", type=Path, help="a local transformers Llama folder (config.json + safetensors)")
    p.add_argument(
        "--layers", type=int, default=0, help="layers to import as finished stages, 0..n_layers (default: 0)"
    )
    p.add_argument("overrides", nargs="*", help="stackwise-train overrides, e.g. data=shakespeare output_root=runs")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)  # overrides before and after --layers
    quiet_known_advice()
    log = logging.getLogger("stackwise")  # the pipeline's progress lines, as stackwise-train shows them
    handler, level = logging.StreamHandler(sys.stderr), log.level
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with user_errors(PROG, debug=args.debug):
            from stackwise.hf.importer import import_llama  # imports torch and Lightning: keep --help instant

            done = import_llama(
                args.folder, args.layers, args.overrides, log=lambda s: print(s, file=sys.stderr, flush=True)
            )
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    print(f"imported {args.folder} into {done.run.exp_dir}; continue with:\n  {done.command}", flush=True)


if __name__ == "__main__":
    main()
