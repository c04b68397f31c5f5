"""`stackwise-train`: compose the config with Hydra, validate it, run the pipeline.

stackwise-train                                   # all stages + fusion on the default config
stackwise-train stage=layer k=3 attention=gqa     # one stage
stackwise-train -m attention=mha,gqa,mla          # a sweep: one experiment folder each
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stackwise.cli.common import CONFIG_PATH, quiet_known_advice, user_errors
from stackwise.config import RunConfig, check_output_dir, experiment_name, register_resolvers
from stackwise.errors import ArtifactWriteError, StackWiseError

log = logging.getLogger("stackwise")


def train(cfg: DictConfig) -> None:
    # Lightning prints through its own handler; stop its records reaching Hydra's root handler too,
    # which printed every Lightning line twice.
    logging.getLogger("lightning").propagate = False
    logging.getLogger("lightning.pytorch").propagate = False
    with user_errors("stackwise-train", debug=bool(cfg.get("debug", False))):
        run = RunConfig.from_hydra(cfg, override_dirname=HydraConfig.get().job.override_dirname)
        log.info(
            "experiment %s -> %s (stage=%s%s)", run.experiment, run.exp_dir, run.stage, f" k={run.k}" if run.k else ""
        )
        from stackwise.pipeline import Pipeline  # imports Lightning; keep `--help` fast

        with disk_errors(run.exp_dir):
            Pipeline(run).execute()


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
        from stackwise.artifacts import os_error_in

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


class EarlyChecks(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): check the values Hydra builds its run folder
    from (experiment, output_root) before it creates that folder, so a bad one is our one-line error
    rather than Hydra's interpolation error or a traceback from its mkdir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_run_folder(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_run_folder(config)


def _check_run_folder(config: DictConfig) -> None:
    with user_errors("stackwise-train", debug=OmegaConf.select(config, "debug") is True):
        experiment = OmegaConf.select(config, "experiment")
        if experiment is not None:
            experiment_name(experiment)
        root = OmegaConf.select(config, "output_root") or "outputs"
        check_output_dir(Path(str(root)).expanduser(), "output_root")


def main() -> None:
    quiet_known_advice()
    register_resolvers()
    hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")(train)()


if __name__ == "__main__":
    main()
