"""A StageObserver that SIGKILLs the process at one named place, for tests/test_resume.py.

Installed in a forked `stackwise-train` (tests/cli_runner.py, `kill_at=`) through the pipeline's
public observer hooks (stackwise/pipeline/events.py); the product knows nothing about it. Points:
  train:<stage>:<s>      at the start of the batch after optimizer step s of stage <stage> (embed,
                         layer_2, finetune, e2e): with a checkpoint every 4 steps, s = 6 leaves step 4's
  cache:<k>:<split>:<b>  after batch b of split 0 (train) / 1 (val) of acts_layer{k} is written
  cached:<k>             after every shard of acts_layer{k}, before its manifest
  saved:<record>         after the stage's weights are written (embed, layer_2, fused, finetuned, e2e)
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback

from stackwise.pipeline import Stage, StageObserver


class KillAt(StageObserver):
    def __init__(self, point: str):
        self.point = point

    def here(self, point: str) -> None:
        if point == self.point:
            os.kill(os.getpid(), signal.SIGKILL)

    def callbacks(self, stage: Stage) -> list[Callback]:
        return [_KillInBatches(self, stage)]

    def saved(self, stage: Stage) -> None:
        self.here(f"saved:{stage.record}")

    def cached(self, stage: Stage) -> None:
        self.here(f"cached:{stage.k}")


class _KillInBatches(Callback):
    def __init__(self, kill: KillAt, stage: Stage):
        self.kill, self.stage = kill, stage

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.kill.here(f"train:{self.stage.name}:{trainer.global_step}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.kill.here(f"cache:{self.stage.k}:{dataloader_idx}:{batch_idx}")
