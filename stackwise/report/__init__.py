"""The depth report: validation loss against layer index k, with the fused, fine-tuned and e2e models beside it.

    write_report(exp_dir)                        -> exp_dir/report.md, exp_dir/depth.png
    write_sweep_report([exp_a, exp_b], out_dir)  -> out_dir/report.md, out_dir/depth.png (one row / curve each)
    write_study_report(study_root)               -> study.md, study_depth.png, study_gaps.png (a depth study:
                                                    benchmarks/depth_study.py; from eval.json and results.json)

Everything comes from the experiment's `results.json` (one record per stage, appended by the
pipeline); nothing is recomputed, so the report is cheap and works on a finished run as well as on a
partial one (only `embed` and `layer_2` so far, say). Pure Python + matplotlib (plots.py); no
Lightning.

Conventions, so that every number in a row means the same thing:
- A stage that was rerun appears once per run in results.json: the last record wins.
- The layer-wise row k describes the model "embeddings + layers 1..k + head" that stage k leaves
  behind. Its `tokens` and `time` are summed over stages 1..k (time: their training and scoring,
  and the caching passes 1..k-1 that fed them): the same convention the pipeline
  uses for the fused and fine-tuned records (cumulative), so the column compares directly with the
  end-to-end baseline's own budget.
- gap to e2e = (loss - e2e loss) / e2e loss, in %: negative means better than the baseline.
- "Every added layer lowers the validation loss" is judged step by step, k-1 -> k; a missing stage
  in between makes that step (and the verdict) "no".
- "Within 5% of e2e" compares the best layer-wise final model (fused or fine-tuned, or the deepest
  layer-wise stage when fusion has not run) with e2e, and reports the two token budgets beside it.

    records.py   DepthResults: results.json's last record per stage, as rows (load_depth_results)
    formats.py   how numbers are written
    markdown.py  the tables and the two verdicts
    plots.py     depth.png: one curve, or one per experiment
    sweep.py     the experiments of a sweep and their labels
    write.py     write_report, write_sweep_report
    study.py     the depth study: layer-wise vs e2e at equal tokens and equal wall time, over depths, budgets, levers, seeds
"""

from stackwise.report.formats import fmt_delta, fmt_loss, fmt_pct, fmt_seconds, fmt_tokens
from stackwise.report.markdown import (
    WITHIN,
    depth_markdown,
    layers_verdict,
    sweep_markdown,
    tokens_note,
    within_verdict,
)
from stackwise.report.plots import DEPTH_PNG, depth_figure, sweep_figure
from stackwise.report.records import DepthResults, Row, Step, load_depth_results
from stackwise.report.study import STUDY_JSON, STUDY_MD, ChainResult, load_study, study_markdown, write_study_report
from stackwise.report.sweep import experiment_names, find_experiments, resolve_experiments, sweep_labels
from stackwise.report.write import REPORT_MD, write_report, write_sweep_report

__all__ = [
    "DEPTH_PNG",
    "REPORT_MD",
    "STUDY_JSON",
    "STUDY_MD",
    "WITHIN",
    "ChainResult",
    "DepthResults",
    "Row",
    "Step",
    "depth_figure",
    "depth_markdown",
    "experiment_names",
    "find_experiments",
    "fmt_delta",
    "fmt_loss",
    "fmt_pct",
    "fmt_seconds",
    "fmt_tokens",
    "layers_verdict",
    "load_depth_results",
    "load_study",
    "resolve_experiments",
    "study_markdown",
    "sweep_figure",
    "sweep_labels",
    "sweep_markdown",
    "tokens_note",
    "within_verdict",
    "write_report",
    "write_study_report",
    "write_sweep_report",
]
