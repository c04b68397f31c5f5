"""The records of one experiment's results.json, as the rows of the depth report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackwise import artifacts as art
from stackwise.errors import ArtifactError, StackWiseError

PathLike = str | Path


FINAL_STAGES = ("fused", "finetuned", "e2e")  # the records of the whole models, by their `stage`


_LABELS = {"fused": "fused", "finetuned": "fused + fine-tuned", "e2e": "end-to-end (e2e)"}


_REQUIRED = ("stage", "val_loss", "val_acc", "tokens", "seconds")


@dataclass
class Row:
    """One model of the report: a layer-wise prefix 1..k, the fused, fine-tuned or e2e model."""

    stage: str  # "embed", "layer_k", "fused", "finetuned", "e2e"
    k: int
    val_loss: float
    val_acc: float
    tokens: int  # tokens seen by this model (cumulative for layer-wise rows, see module doc)
    seconds: float  # wall time that produced it (same convention)

    @property
    def label(self) -> str:
        return _LABELS.get(self.stage, self.stage)


@dataclass
class Step:
    """k-1 -> k: did adding layer k lower the validation loss?"""

    k: int
    delta: float | None  # loss(k) - loss(k-1); None when stage k-1 has no record

    @property
    def lowers(self) -> bool:
        return self.delta is not None and self.delta < 0  # NaN compares False: not lowered


@dataclass
class DepthResults:
    """The last record of every stage of one experiment, in depth order."""

    name: str
    exp_dir: Path
    layers: list[Row] = field(default_factory=list)  # k ascending
    fused: Row | None = None
    finetuned: Row | None = None
    e2e: Row | None = None

    # -- derived views
    def rows(self) -> list[Row]:
        """Every model, in table order: layer-wise by k, then fused, fine-tuned, e2e."""
        return self.layers + [r for r in (self.fused, self.finetuned, self.e2e) if r is not None]

    @property
    def n_layers(self) -> int | None:
        ks = [r.k for r in self.rows()]
        return max(ks) if ks else None

    def steps(self) -> list[Step]:
        """One step per layer-wise stage k >= 2 present (and per gap in between)."""
        by_k = {r.k: r for r in self.layers}
        if len(by_k) < 1:
            return []
        return [
            Step(k, by_k[k].val_loss - by_k[k - 1].val_loss if k - 1 in by_k and k in by_k else None)
            for k in range(min(by_k) + 1, max(by_k) + 1)
        ]

    def every_layer_lowers(self) -> bool | None:
        """True/False; None when fewer than two layer-wise stages exist (nothing to judge)."""
        steps = self.steps()
        if not steps:
            return None
        return all(s.lowers for s in steps) and min(r.k for r in self.layers) == 1

    def best_layerwise(self) -> Row | None:
        """The lowest-loss final layer-wise model: fused or fine-tuned; the deepest stage before fusion."""
        finals = [r for r in (self.fused, self.finetuned) if r is not None]
        if not finals:
            finals = self.layers[-1:]
        if not finals:
            return None
        return min(finals, key=lambda r: (_sortable(r.val_loss), r.tokens))

    def gap(self, row: Row | None) -> float | None:
        """(loss - e2e) / e2e as a fraction; None without an e2e record."""
        if row is None or self.e2e is None:
            return None
        if self.e2e.val_loss == 0:
            return math.nan
        return (row.val_loss - self.e2e.val_loss) / self.e2e.val_loss


def _sortable(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _number(rec: dict, key: str, where: str, kind: type) -> Any:
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArtifactError(f"{where}: {key}={value!r} is not a number; the file is not a StackWise results.json")
    return kind(value)


def _last_records(paths: art.ExperimentPaths) -> dict[str, dict]:
    """{stage: its latest record}, in order of completion; StackWiseError when there is none."""
    records = art.read_results(paths)
    if not records:
        raise StackWiseError(
            f"{paths.root} has no results ({paths.results_json.name} is missing or empty): "
            f"run stackwise-train for this experiment first"
        )
    last: dict[str, dict] = {}
    for i, rec in enumerate(records):
        missing = [key for key in _REQUIRED if key not in rec]
        if missing:
            raise ArtifactError(
                f"{paths.results_json} record {i} has no {missing[0]!r}; the file is not a StackWise results.json"
            )
        last.pop(str(rec["stage"]), None)  # keep the latest run of a stage, in order of completion
        last[str(rec["stage"])] = rec
    return last


def load_depth_results(exp_dir: PathLike, name: str | None = None) -> DepthResults:
    """Read `<exp_dir>/results.json` into a DepthResults; StackWiseError (one line) when there is none."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise StackWiseError(f"experiment folder {exp_dir} does not exist")
    paths = art.ExperimentPaths(exp_dir)
    last = _last_records(paths)
    out = DepthResults(name=name or exp_dir.resolve().name, exp_dir=exp_dir)
    stage_rows: list[Row] = []
    for stage, rec in last.items():
        where = f"{paths.results_json} stage {stage}"
        layerwise = rec.get("kind") == "layer"  # the record says what it is (stackwise/pipeline/stage.py)
        if not layerwise and stage not in FINAL_STAGES:
            continue  # a stage this report does not know (future kinds): leave it out rather than fail
        k = _number(rec, "k", where, int) if "k" in rec else 0
        if layerwise and k < 1:
            raise ArtifactError(f"{where}: a layer-wise record needs k >= 1; the file is not a StackWise results.json")
        row = Row(
            stage,
            k,
            _number(rec, "val_loss", where, float),
            _number(rec, "val_acc", where, float),
            _number(rec, "tokens", where, int),
            _number(rec, "seconds", where, float),
        )
        if layerwise:
            cache = _number(rec, "cache_seconds", where, float) if "cache_seconds" in rec else 0.0
            stage_rows.append((row, cache))
        else:
            setattr(out, stage, row)
    # layer-wise records hold one stage's own tokens and time (its training; its caching pass apart):
    # sum them, so row k is the model 1..k and what it cost: training 1..k and the caches 1..k-1 it read
    tokens, seconds, cached = 0, 0.0, 0.0
    for row, cache in sorted(stage_rows, key=lambda rc: rc[0].k):
        tokens, seconds, cached = tokens + row.tokens, seconds + cached + row.seconds, cache
        out.layers.append(Row(row.stage, row.k, row.val_loss, row.val_acc, tokens, seconds))
    for attr in FINAL_STAGES:  # fused / fine-tuned / e2e records carry no k of their own: depth L
        row = getattr(out, attr)
        if row is not None and row.k <= 0:
            row.k = out.layers[-1].k if out.layers else 0
    return out
