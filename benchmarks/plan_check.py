#!/usr/bin/env python
"""The memory planner's predictions (stackwise/plan.py) against the peaks a real run measures.

    python benchmarks/plan_check.py --set model=seed model.n_layers=2 data.seq_len=2048 data.batch_size=4 \\
        hardware=gpu trainer.max_steps=6 --out plan_seed.json                  # GPU: predicted vs measured
    python benchmarks/plan_check.py --set model=tiny                          # CPU: the predictions only

On a GPU it runs `stackwise-train`'s pipeline in this process for each `--stages` setting (default
`all`, then `e2e`; `layer` means `stage=layer k=2`) with an observer on every stage: the training
peak is torch.cuda.max_memory_allocated from the first training batch to the end of fit (the
stage's weights and optimizer are there by then), the caching pass's from its start to its end.
The training loss of every step is kept too, so the same run says whether the loss falls.
`--probe` also measures what one block of each attention kind saves for backward (eager and
compiled, in the run's precision) beside `stackwise.plan.block_activation_bytes`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from stackwise.plan import GIB, Numerics, block_activation_bytes, format_plan, plan_run  # noqa: E402

# planned stage key -> the pipeline's stage name
MEASURED = {"embed": "embed", "layer": "layer_2", "finetune": "finetune", "e2e": "e2e"}


def compose(overrides: list[str]):
    from stackwise.config import compose_run

    return compose_run(overrides)


def probe_class():
    """A StageObserver measuring GPU peaks and losses (imported here: it needs Lightning)."""
    from lightning.pytorch.callbacks import Callback

    from stackwise.pipeline import StageObserver

    class Probe(Callback):
        """Peaks per phase of a training step: forward (batch start to the loss), backward, step
        (clipping, AdamW), between (checkpoint, validation: from the batch end to the next batch)."""

        def __init__(self, record: dict):
            self.record = record

        def _phase(self, name: str) -> None:
            peaks = self.record.setdefault("phase_peak_gib", {})
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / GIB)
            torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if "train_start_gib" not in self.record:  # weights and inputs are on the device by now
                self.record["train_start_gib"] = torch.cuda.memory_allocated() / GIB
                torch.cuda.reset_peak_memory_stats()
            else:
                self._phase("between")

        def on_before_backward(self, trainer, module, loss):
            self._phase("forward")
            self.record["after_forward_gib"] = torch.cuda.memory_allocated() / GIB

        def on_after_backward(self, trainer, module):
            self._phase("backward")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self._phase("step")
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.record.setdefault("losses", []).append(float(loss))

        def on_train_end(self, trainer, module):
            self._phase("between")
            self.record["train_peak_gib"] = max(self.record["phase_peak_gib"].values())

        def on_predict_start(self, trainer, module):
            self.record["cache_start_gib"] = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()

        def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            rows = int(batch["targets"].shape[0])
            self.record["cache_batch_rows"] = max(self.record.get("cache_batch_rows", 0), rows)

        def on_predict_end(self, trainer, module):
            self.record["cache_peak_gib"] = torch.cuda.max_memory_allocated() / GIB

    class Observer(StageObserver):
        def __init__(self):
            self.records: dict[str, dict] = {}

        def callbacks(self, stage):
            return [Probe(self.records.setdefault(stage.name, {}))]

    return Observer


def run_stages(overrides: list[str], stages: list[str], done=lambda records: None) -> dict[str, dict]:
    """Each `stage=` setting in turn, in this process; `done(records)` after each (a long run that is
    stopped keeps what it measured)."""
    from stackwise.pipeline import Pipeline

    observer = probe_class()()
    for setting in stages:
        extra = ["stage=layer", "k=2"] if setting == "layer" else [f"stage={setting}"]
        Pipeline(compose(overrides + extra), observers=[observer]).execute()
        done(observer.records)
    return observer.records


def probe_blocks(run) -> list[dict[str, Any]]:
    """Bytes one block of each kind saves for backward (allocated after its forward, less its output)."""
    from stackwise.model.transformer import Block

    cfg, out = run.model, []
    precision = run.trainer_kwargs("layer").get("precision")
    num = Numerics.of(precision)
    T, B = run.data.seq_len, max(1, run.data.batch_size)
    for kind in sorted(set(cfg.layer_kinds())):
        k = cfg.layer_kinds().index(kind) + 1
        with torch.device("meta"):
            block = Block(cfg, k)
        block = block.to_empty(device="cuda").to({4: torch.float32, 2: torch.bfloat16}[num.w])
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        for compiled in (False, True):
            if compiled:
                block.compile()
            h = torch.randn(B, T, cfg.d_model, device="cuda", dtype=block.attn_norm.weight.dtype)
            for _ in range(2):  # the first call compiles
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=num.autocast):
                    y = block(h)
                saved = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
                y.float().sum().backward()
                del y
            copies = sum(p.numel() for p in block.parameters() if p.ndim == 2) * num.a if num.autocast else 0
            planned = block_activation_bytes(block, B * T, num, compiled)
            out.append(
                {
                    "kind": kind,
                    "compiled": compiled,
                    "measured_gib": saved / GIB,
                    "planned_gib": (planned + copies) / GIB,
                    "autocast_copies_gib": copies / GIB,
                }
            )
        del block
        torch.cuda.empty_cache()
    return out


def compare(plan, records: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for s in plan.stages:
        rec = records.get(MEASURED.get(s.key, ""), {})
        if "train_peak_gib" not in rec:
            continue
        row = {"stage": s.name, "planned_gib": s.peak / GIB, "measured_gib": rec["train_peak_gib"]}
        row["ratio"] = row["planned_gib"] / row["measured_gib"]
        if s.caching is not None and "cache_peak_gib" in rec:
            row.update(planned_cache_gib=s.caching / GIB, measured_cache_gib=rec["cache_peak_gib"])
        row["phases_gib"] = rec.get("phase_peak_gib")
        fixed = (s.memory["weights"] + s.memory["optimizer"] + s.memory["inputs"]) / GIB
        row["planned_moments_gib"] = {k: fixed + v / GIB for k, v in s.moments.items()}
        losses = rec.get("losses", [])
        if losses:
            row.update(steps=len(losses), loss_first=losses[0], loss_last=losses[-1], loss_max=max(losses))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="stackwise-train overrides")
    ap.add_argument("--stages", default="all,e2e", help="stage= settings to run in turn (layer = k=2)")
    ap.add_argument("--probe", action="store_true", help="also measure one block of each kind")
    ap.add_argument("--out", type=Path, help="write the predictions and measurements as JSON")
    args = ap.parse_args(argv)
    overrides = list(args.set)
    if not any(o.startswith("output_root=") for o in overrides):
        overrides.append(f"output_root={tempfile.mkdtemp(prefix='plan_check_')}")
    overrides += ["sample.enabled=false", "logger=none"]
    plan = plan_run(compose(overrides))
    print(format_plan(plan))
    report: dict[str, Any] = {"overrides": overrides, "plan": plan.to_dict()}
    if not torch.cuda.is_available():
        print("no CUDA device: predictions only")
    else:
        report["gpu"] = torch.cuda.get_device_name()
        if args.probe:
            report["blocks"] = probe_blocks(compose(overrides))
            for b in report["blocks"]:
                print(
                    f"block {b['kind']} compiled={b['compiled']}: planned {b['planned_gib']:.3f} GiB, "
                    f"measured {b['measured_gib']:.3f} GiB"
                )

        def done(records: dict) -> None:
            report.update(records=records, compare=compare(plan, records))
            save(report, args.out)

        run_stages(overrides, args.stages.split(","), done)
        for row in report["compare"]:
            print(json.dumps(row))
    save(report, args.out)


def save(report: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
