"""The stage graph and what it needs to run; docs/ARCHITECTURE.md draws how the modules fit.

stage.py     Stage: one stage's names in every vocabulary; plan(): the stages a `stage=` setting runs
graph.py     Pipeline: per stage, what it needs, whether it is complete, run it, save it, cache it
state.py     ExperimentState: what the experiment folder holds (complete, foreign, resumable)
trainers.py  Trainers: the only place lightning.Trainers are built
ranks.py     write_once: files are written by global rank 0 only
console.py   the results table, the depth summary, the end-of-run report and sample
events.py    StageObserver: public hooks at stage boundaries (tests/test_resume.py kills through them)
"""

from stackwise.pipeline.events import StageObserver, observe
from stackwise.pipeline.graph import Pipeline
from stackwise.pipeline.stage import Stage, plan

__all__ = ["Pipeline", "Stage", "StageObserver", "observe", "plan"]
