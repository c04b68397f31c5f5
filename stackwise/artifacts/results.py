"""`results.json`: one summary record per stage, replaced when the stage runs again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from stackwise.artifacts.atomic import atomic_write_json
from stackwise.artifacts.messages import json_normal, one_line
from stackwise.artifacts.paths import ExperimentPaths
from stackwise.errors import ArtifactError


def read_results(paths: ExperimentPaths) -> list[dict[str, Any]]:
    """The summary records of the experiment, one per stage, in the order the stages first ran ([]
    when none was written yet). Files written before records were replaced may hold a stage twice:
    its last record counts."""
    p = paths.results_json
    if not p.is_file():
        return []
    try:
        records = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{p} is not valid JSON ({one_line(e, 120)}); delete it to start a new one") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ArtifactError(f"{p} is not a list of result records; delete it to start a new one")
    by_stage: dict[Any, dict[str, Any]] = {}
    for r in records:
        by_stage[r.get("stage")] = r  # a dict keeps the first position of a key and takes its last value
    return list(by_stage.values())


def record_result(paths: ExperimentPaths, record: Mapping[str, Any]) -> None:
    """Write one stage's record (val loss, acc, tokens, seconds, ...) to results.json, atomically: a
    stage run again replaces its record, in place.

    Call it from one process only (global rank 0) and under the experiment's lock (stackwise/lock.py):
    it is a read-modify-write.
    """
    rec = json_normal(dict(record))
    records = read_results(paths)
    for i, r in enumerate(records):
        if r.get("stage") == rec.get("stage"):
            records[i] = rec
            break
    else:
        records.append(rec)
    atomic_write_json(records, paths.results_json)
