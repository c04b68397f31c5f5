"""The whole model as one stage: the end-to-end baseline (`e2e`) and the fusion fine-tune."""

from __future__ import annotations

from torch import Tensor, nn

from stackwise.config import OptimConfig
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer
from stackwise.objective.loss import LinearHead
from stackwise.stages.base import StageModule, trainable


class FullModelStage(StageModule):
    """Every trainable tensor of the model, trained jointly on token data."""

    def __init__(
        self,
        cfg: ModelConfig,
        optim: OptimConfig,
        weighting: str,
        max_steps: int,
        stage_name: str,
        model: Transformer | None = None,
    ):
        super().__init__(cfg, optim, weighting, max_steps)
        self.stage_name = stage_name
        self.model = model if model is not None else Transformer(cfg)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return trainable(self.model)

    def rebuild(self) -> FullModelStage:
        return FullModelStage(self.cfg, self.optim, self.weighting, self.max_steps_total, self.stage_name)

    def hidden_states(self, batch: dict) -> Tensor:
        h = self.model.embed_tokens(batch["ids"])  # (B, T, D)
        return self.model.run_layers(h, 1, self.cfg.n_layers, pad_mask=self.pad_mask(batch))

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def linear_head(self) -> LinearHead:
        return LinearHead(*self.model.head_as_linear())
