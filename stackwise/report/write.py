"""Writing report.md and depth.png, for one experiment or a sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stackwise import artifacts as art
from stackwise.errors import StackWiseError
from stackwise.report.markdown import depth_markdown, sweep_markdown
from stackwise.report.plots import DEPTH_PNG, depth_figure, png_bytes, sweep_figure
from stackwise.report.records import PathLike, load_depth_results
from stackwise.report.sweep import experiment_names, sweep_labels

REPORT_MD = "report.md"


def _write(out_dir: Path, markdown: str, fig) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out_dir / REPORT_MD, out_dir / DEPTH_PNG
    # the plot first: report.md links to it, so a reader of the table finds the picture
    art.atomic_write_bytes(png_bytes(fig), png_path)
    art.atomic_write_bytes(markdown.encode("utf-8"), md_path)
    return md_path, png_path


def write_report(exp_dir: PathLike, out_dir: PathLike | None = None) -> tuple[Path, Path]:
    """Write report.md + depth.png for one experiment (into exp_dir unless out_dir); return their paths.

    Raises StackWiseError (one line) when the folder or its results are missing or unreadable.
    """
    res = load_depth_results(exp_dir)
    return _write(Path(out_dir) if out_dir is not None else Path(exp_dir), depth_markdown(res), depth_figure(res))


def write_sweep_report(exp_dirs: Sequence[PathLike], out_dir: PathLike) -> tuple[Path, Path]:
    """One combined table (a row per experiment) and one plot (a curve per experiment) in out_dir."""
    if not exp_dirs:
        raise StackWiseError("no experiment folders given")
    folders = experiment_names(exp_dirs)
    labels, common = sweep_labels(folders)
    results = [load_depth_results(d, label) for d, label in zip(exp_dirs, labels, strict=True)]
    markdown = sweep_markdown(results)
    if labels != folders:
        markdown += (
            "\nRows are labelled by the overrides that differ (keys shortened); the folders: "
            + ", ".join(f"`{f}`" for f in folders)
            + (f". Common to all: `{','.join(common)}`." if common else ".")
            + "\n"
        )
    return _write(Path(out_dir), markdown, sweep_figure(results))
