"""One stage of the graph as a value, named once in every vocabulary the code and the files use.

    Stage.layer(1)     kind layer     k 1   name embed     budget embed   hash layer    record embed
    Stage.layer(3)     kind layer     k 3   name layer_3   budget layer   hash layer    record layer_3
    Stage.fusion(L)    kind fusion    k L   name fusion    budget fusion  hash fusion   record fused
    Stage.finetune(L)  kind finetune  k L   name finetune  budget fusion  hash fusion   record finetuned
    Stage.e2e(L)       kind e2e       k L   name e2e       budget e2e     hash e2e      record e2e

- `name`: the run's own name: ckpt/<name>/, its TensorBoard run, its dropout stream, messages.
- `budget`: the key of RunConfig's per-stage settings (`trainer_kwargs`, `optim_for`, `max_steps`).
- `hash_key`: the key of `RunConfig.hashes()` that ties its artifacts to the settings.
- `record`: its results.json record (`stage`; the record's `kind` and `k` are this value's).
- `k`: the layer it trains, or for the whole-model stages the depth of the model (n_layers).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    kind: str  # layer | fusion | finetune | e2e
    k: int
    name: str
    budget: str
    hash_key: str
    record: str
    first: bool = False  # layer 1: starts from token ids and trains the embedding

    @classmethod
    def layer(cls, k: int) -> Stage:
        if k == 1:  # the one place that knows layer 1 is the embedding stage
            return cls("layer", 1, "embed", "embed", "layer", "embed", first=True)
        return cls("layer", k, f"layer_{k}", "layer", "layer", f"layer_{k}")

    @classmethod
    def fusion(cls, n_layers: int) -> Stage:
        return cls("fusion", n_layers, "fusion", "fusion", "fusion", "fused")

    @classmethod
    def finetune(cls, n_layers: int) -> Stage:
        return cls("finetune", n_layers, "finetune", "fusion", "fusion", "finetuned")

    @classmethod
    def e2e(cls, n_layers: int) -> Stage:
        return cls("e2e", n_layers, "e2e", "e2e", "e2e", "e2e")

    @property
    def below(self) -> Stage | None:
        """The layer stage whose weights and activations this layer stage starts from (None for layer 1)."""
        return None if self.first or self.kind != "layer" else Stage.layer(self.k - 1)

    @property
    def command(self) -> str:
        """The `stackwise-train` settings that run this stage alone (for messages)."""
        if self.kind == "layer":
            return "stage=embed" if self.first else f"stage=layer k={self.k}"
        return "stage=e2e" if self.kind == "e2e" else "stage=fusion"


def plan(setting: str, k: int | None, n_layers: int, layer_stages: int | None = None) -> list[Stage]:
    """The stages one `stage=` setting runs, in order (the fine-tune runs inside fusion).
    `layer_stages`: the layer stages 1..K (default n_layers; n_layers - layerwise.top_layers)."""
    if setting == "all":
        last = n_layers if layer_stages is None else layer_stages
        return [Stage.layer(i) for i in range(1, last + 1)] + [Stage.fusion(n_layers)]
    if setting == "embed":
        return [Stage.layer(1)]
    if setting == "layer":
        return [Stage.layer(int(k))]
    if setting == "fusion":
        return [Stage.fusion(n_layers)]
    if setting == "e2e":
        return [Stage.e2e(n_layers)]
    raise ValueError(f"unknown stage setting {setting!r}")
