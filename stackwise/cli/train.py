"""`stackwise-train`: compose the config with Hydra, validate it, run the pipeline.

stackwise-train                                   # all stages + fusion on the default config
stackwise-train stage=layer k=3 attention=gqa     # one stage
stackwise-train -m attention=mha,gqa,mla          # a sweep: one experiment folder each
stackwise-train experiment=plain_greedy           # a named preset of stackwise/conf/experiment/
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser, so flags mean what they mean to it
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from stackwise.artifacts import os_error_in
from stackwise.cli.common import quiet_known_advice, user_errors
from stackwise.config import CONFIG_MODULE, RunConfig, check_command_line, register_configs
from stackwise.errors import ArtifactWriteError, StackWiseError

log = logging.getLogger("stackwise")


def train(cfg: DictConfig) -> None:
    with user_errors("stackwise-train", debug=bool(cfg.get("debug", False))):
        run = RunConfig.from_hydra(cfg, HydraConfig.get().overrides.task)
        log.info("experiment %s -> %s (stage=%s%s)", run.name, run.exp_dir, run.stage, f" k={run.k}" if run.k else "")
        from stackwise.pipeline import Pipeline  # imports Lightning; keep `--help` fast

        lightning_logs_through_hydra()

        with disk_errors(run.exp_dir):
            Pipeline(run).execute()


def lightning_logs_through_hydra() -> None:
    """Lightning's info lines ("GPU available: ...") once each, on the console and in train.log:
    through Hydra's root handlers. Imported before Hydra set logging up, Lightning adds a console
    handler of its own and stops propagation (its lines then missed train.log; both together
    printed them twice); imported after, it adds none, and a stopped propagation lost them."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


# errors of the disk, whoever was writing: never a StackWise bug
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """A full or read-only disk met outside StackWise's own writers (which raise ArtifactWriteError
    naming their file), e.g. by TensorBoard's event writer, is still one line: naming the file when
    the OS error does, else the experiment folder.

    Lightning runs its failure hooks (a logger's final flush) after an error in fit or predict; on a
    full disk those fail too and their OSError replaces ours, so the ArtifactWriteError it was raised
    while handling, which names the file that did not fit, is reported instead.
    """
    try:
        yield
    except StackWiseError:
        raise
    except Exception as e:
        err = os_error_in(e)
        if err is None or err.errno not in DISK_ERRNOS:
            raise
        ours = e.__context__
        while ours is not None and not isinstance(ours, ArtifactWriteError):
            ours = ours.__context__
        if ours is not None:
            raise ours from e
        where = os.fsdecode(err.filename) if err.filename is not None else f"a file under {folder}"
        raise ArtifactWriteError(where, err.errno, err.strerror or "") from e


def check_before_hydra(argv: list[str]) -> None:
    """Compose and validate the command line's config (every job of a `-m` sweep) before Hydra
    runs anything, so that a bad value, a wrong type or an unknown key is one line, exit status 2:
    Hydra would print its own multi-line report, and in a sweep only when that job's turn came.
    `--cfg` only composes (printing a config runs nothing, so its values need not be valid). Left
    to Hydra: its help and info flags, and a config other than the packaged one."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        return
    if args.config_path or args.config_dir or args.config_name not in (None, "config"):
        return
    with user_errors("stackwise-train", debug=_debug_requested(args.overrides)):
        check_command_line(args.overrides, multirun=args.multirun, validate=not args.cfg)


def _debug_requested(overrides: list[str]) -> bool:
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return False
    return any(o.key_or_group == "debug" and o.value() is True for o in parsed)


def main() -> None:
    quiet_known_advice()
    register_configs()
    check_before_hydra(sys.argv[1:])
    hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")(train)()


if __name__ == "__main__":
    main()
