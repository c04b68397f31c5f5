"""The experiments of a sweep: found under an output root, labelled by the overrides that differ."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stackwise import artifacts as art
from stackwise.errors import StackWiseError
from stackwise.report.records import PathLike


def experiment_names(exp_dirs: Sequence[PathLike]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [Path(d).resolve().name for d in exp_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(exp_dirs, names, strict=True)]


_GENERIC_KEY_PARTS = {"stages", "trainer", "optim"}


def _split_overrides(name: str) -> list[str] | None:
    """`a.b=1,c=[x,y]` -> ["a.b=1", "c=[x,y]"] (commas inside brackets kept); None if not such a list."""
    parts, depth, cur = [], 0, ""
    for ch in name:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts if all("=" in p for p in parts) else None


def _short_key(key: str) -> str:
    """`+stages.embed.trainer.max_steps` -> `embed.max_steps`; `trainer.max_steps` -> `max_steps`."""
    kept = [p for p in key.lstrip("+~").split(".") if p not in _GENERIC_KEY_PARTS]
    return ".".join(kept[-2:]) or key


def sweep_labels(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(labels, common): experiment names made of overrides (Hydra's derived names) lose the
    overrides they all share (returned as `common`) and their keys are shortened, so a sweep's
    legend and table show what differs; other names are kept as they are."""
    split = [_split_overrides(n) for n in names]
    if len(names) < 2 or any(p is None for p in split):
        return list(names), []
    common = [p for p in split[0] if all(p in other for other in split[1:])]
    labels = []
    for parts, name in zip(split, names, strict=True):
        rest = [p for p in parts if p not in common]
        labels.append(",".join(f"{_short_key(p.split('=', 1)[0])}={p.split('=', 1)[1]}" for p in rest) or name)
    if len(set(labels)) < len(labels):  # shortening made two alike: keep the full names
        return list(names), []
    return labels, common


def find_experiments(folder: PathLike) -> list[Path]:
    """The sub-folders of `folder` that hold a results.json (a sweep's output root), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and art.ExperimentPaths(p).results_json.is_file()
    )


def resolve_experiments(folders: list[Path]) -> tuple[list[Path], bool]:
    """(experiment folders, expanded): a single folder without results.json but with experiment
    sub-folders (a sweep's output root) stands for those sub-folders."""
    for folder in folders:
        if not folder.is_dir():
            raise StackWiseError(f"experiment folder {folder} does not exist")
    if len(folders) == 1 and not art.ExperimentPaths(folders[0]).results_json.is_file():
        found = find_experiments(folders[0])
        if found:
            return found, True
    return folders, False
