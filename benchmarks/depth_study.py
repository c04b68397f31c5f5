"""The depth study: does layer-wise training hold at depth? One command runs the sweep and writes the table.

    python benchmarks/prepare_corpus.py                                   # once: benchmarks/corpus/
    python benchmarks/depth_study.py --device cuda --jobs 8 --deadline 540 --part 1/2   # then --part 2/2
    python benchmarks/depth_study.py --device cuda --seeds 0 1 2 --levers top1="layerwise.top_layers=1" \\
        ema="optim.ema_decay=0.999"
    python benchmarks/depth_study.py --report-only --root outputs/depth-study   # the table and plots again
    python benchmarks/depth_study.py --smoke --root /tmp/smoke             # a tiny CPU run of the whole path

For every depth L (--depths), budget (--budgets: multiples of --steps per layer stage and of
--finetune-steps for the fusion fine-tune; stage 1 takes layerwise.embed_budget x as usual), lever
(--levers NAME="OVERRIDES", plus `base`, the defaults) and seed (--seeds), one chain of runs:

1. `stackwise-train stage=all` (embed, layers 2..L, fusion and its fine-tune) in runs/<id>/;
2. `stage=e2e` in the same folder: the baseline at EQUAL TOKENS (its max_steps defaults to the
   layer-wise total, fine-tune included: RunConfig.layerwise_steps);
3. `stackwise-eval` of that folder: every depth prefix 1..L, fused, fine-tuned, e2e, on the same
   validation masks: masked CE at --rates and the masked-diffusion bound, in bits/byte; and its
   `stackwise-report` (report.md, depth.png: each stage's validation loss, tokens and time);
4. the baseline at EQUAL WALL TIME in runs/<id>-wall/: `stage=e2e` with
   `stages.e2e.trainer.max_steps` = the layer-wise run's seconds (its fine-tuned record: training,
   scoring and caching of every stage, cumulative) / e2e's seconds per step measured in step 2. A
   step budget rather than `trainer.max_time`, so its learning-rate schedule ends where it should
   (max_time would cut the cosine short); the seconds it really took are in the table beside the
   layer-wise ones (the `wall ratio` column);
5. `stackwise-eval` of the wall folder (same seed: the same validation masks as step 3);
6. with --samplers N, once the chains are done: benchmarks/samplers.py on each chain's fused,
   fine-tuned and e2e models (N samples per setting; runs/<id>/samplers.json), a section of study.md.

Chains run side by side (--jobs N worker processes: small models leave a GPU mostly idle), each step
is skipped once done (results.json / eval.json say so), and a run killed at any point resumes from
its checkpoint (stackwise-train does), so the study goes in several device commands: --part i/n
takes every n-th chain, --deadline S stops the workers after S seconds (what they leave is resumed
next time) and writes the table of what is done. Wall times are measured with the other chains
running beside: layer-wise and e2e alike, so the ratio holds roughly; --jobs 1 for clean times.

Output (--root, default outputs/depth-study, git-ignored): study.json (the plan), runs/, logs/,
study.md + study_depth.png + study_gaps.png (stackwise-report ROOT writes them again), and with
--export DIR a copy of the small files (results.json, eval.json, run_config.json, the logs, the
report) to bring back from the GPU machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .`

DEFAULT_CORPUS = REPO / "benchmarks" / "corpus"
CORPUS_TXT = "debian-docs.txt"
LEVER_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class Chain:
    """One (depth, budget, lever, seed): a layer-wise run, its e2e at equal tokens and at equal wall time."""

    id: str
    L: int
    budget: float
    lever: str
    seed: int
    overrides: list[str]  # stackwise-train overrides common to the chain's runs (name= added per run)
    lw_steps: int = 0  # optimizer steps of the layer-wise run (= e2e's at equal tokens)
    stage_steps: dict = field(default_factory=dict)  # {"embed", "layer", "finetune"}: steps of each stage
    tokens_per_step: int = 0
    e2e_hash: str = ""

    @property
    def lw(self) -> str:
        return f"runs/{self.id}"

    @property
    def wall(self) -> str:
        return f"runs/{self.id}-wall"


@dataclass
class Plan:
    root: Path
    device: str
    rates: list[float]
    bound_samples: int
    eval_sequences: int | None
    keep_acts: bool
    wall_cap: float = 8.0
    chains: list[Chain] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": "stackwise.depth_study.v1",
            "device": self.device,
            "rates": self.rates,
            "bound_samples": self.bound_samples,
            "eval_sequences": self.eval_sequences,
            "keep_acts": self.keep_acts,
            "wall_cap": self.wall_cap,
            "settings": self.settings,
            "chains": [asdict(c) for c in self.chains],
        }

    @classmethod
    def from_json(cls, root: Path, d: dict) -> Plan:
        plan = cls(
            root, d["device"], d["rates"], d["bound_samples"], d["eval_sequences"], d["keep_acts"], d["wall_cap"]
        )
        plan.settings = d["settings"]
        plan.chains = [Chain(**c) for c in d["chains"]]
        return plan


# ---------------------------------------------------------------------------------------------- the plan
def parse_levers(items: list[str]) -> dict[str, list[str]]:
    levers = {"base": []}
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not LEVER_NAME.match(name):
            die(f'--levers: {item!r} is not NAME="OVERRIDES" (NAME of letters, digits, _)')
        if name == "base":
            die("--levers: `base` is the run with the defaults; give the lever another name")
        levers[name] = shlex.split(rest)
    return levers


def _fmt_budget(b: float) -> str:
    return f"{b:g}".replace(".", "p")


def _merge(*groups: list[str]) -> list[str]:
    """Overrides in order, a later value of the same key replacing an earlier one (Hydra refuses a key twice)."""
    out: dict[str, str] = {}
    for group in groups:
        for o in group:
            key = o.split("=", 1)[0].lstrip("+~")
            out.pop(key, None)
            out[key] = o
    return list(out.values())


def build_plan(args, corpus_overrides: list[str]) -> Plan:
    levers = parse_levers(args.levers)
    if args.no_base:
        levers.pop("base")
        if not levers:
            die("--no-base needs at least one --levers entry")
    # disk, as the study's runs so far (hardware=gpu defaults to cache.store=auto; the store changes
    # wall times, never the values a stage sees: tests/test_recompute.py)
    hardware = ["hardware=gpu", "cache.store=disk"] if args.device == "cuda" else ["hardware=cpu"]
    model = [
        f"model.d_model={args.d_model}",
        f"model.n_heads={args.n_heads}",
        f"model.n_kv_heads={args.n_kv_heads}",
        f"model.d_ff={args.d_ff or round(args.d_model * 2.75 / 8) * 8}",
    ]
    plan = Plan(
        args.root,
        args.device,
        [float(r) for r in args.rates],
        args.bound_samples,
        args.eval_sequences,
        args.keep_acts,
        args.wall_cap,
    )
    plan.settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    plan.settings["machine"] = machine(args.device)
    for L in args.depths:
        for budget in args.budgets:
            steps = max(1, round(args.steps * budget))
            finetune = max(0, round(args.finetune_steps * budget))
            for lever, lever_overrides in levers.items():
                for seed in args.seeds:
                    cid = f"L{L}-x{_fmt_budget(budget)}-{lever}-s{seed}"
                    overrides = _merge(
                        hardware,
                        corpus_overrides,
                        model,
                        [
                            f"model.n_layers={L}",
                            f"data.seq_len={args.seq_len}",
                            f"data.batch_size={args.batch_size}",
                            f"data.val_fraction={args.val_fraction}",
                            f"data.cache_dir={args.root / 'tokens'}",
                            f"trainer.max_steps={steps}",
                            f"trainer.val_check_interval={min(args.val_every, steps)}",
                            f"fusion.finetune_steps={finetune}",
                            f"seed={seed}",
                            f"output_root={args.root / 'runs'}",
                            "trainer.enable_progress_bar=false",
                            "sample.enabled=false",
                            "cache.keep=last",
                        ],
                        args.set,
                        [o.replace("{L}", str(L)) for o in lever_overrides],  # a lever sized by depth
                    )
                    plan.chains.append(Chain(cid, L, budget, lever, seed, overrides))
    return plan


def machine(device: str) -> str:
    import platform

    import torch

    where = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else platform.processor()
    return (
        f"{where or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d', time.gmtime())}"
    )


def compose(overrides: list[str]):
    from hydra.core.global_hydra import GlobalHydra

    from stackwise.config import compose_run

    GlobalHydra.instance().clear()
    return compose_run(overrides)


def size_plan(plan: Plan) -> None:
    """Compose every chain's config (any bad value stops here, one line) and count its steps."""
    for c in plan.chains:
        run = compose(c.overrides + [f"name={c.id}"])
        c.lw_steps = run.layerwise_steps()
        c.stage_steps = {
            "embed": run.max_steps("embed"),
            "layer": run.max_steps("layer"),
            "finetune": run.fusion.finetune_steps,
        }
        c.tokens_per_step = run.tokens_per_step("e2e")
        c.e2e_hash = run.hashes()["e2e"][:12]
        if run.max_steps("e2e") != c.lw_steps:
            print(f"note: {c.id}: e2e's max_steps is {run.max_steps('e2e')}, not the layer-wise {c.lw_steps}")


def select_part(chains: list[Chain], part: str | None) -> list[Chain]:
    if not part:
        return list(chains)  # a copy: main() adds other invocations' chains to the plan, not to this run
    m = re.fullmatch(r"(\d+)/(\d+)", part)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        die(f"--part must be i/n with 1 <= i <= n, got {part!r}")
    i, n = int(m.group(1)), int(m.group(2))
    # heaviest first, dealt round-robin: every part gets a share of the long chains
    ranked = sorted(chains, key=lambda c: -c.lw_steps * c.L)
    return [c for j, c in enumerate(ranked) if j % n == i - 1]


def print_estimate(plan: Plan, chains: list[Chain], root: Path) -> None:
    todo = [c for c in chains if not chain_done(root, c)]
    lw = sum(c.lw_steps for c in todo)
    tok = sum(c.lw_steps * c.tokens_per_step for c in todo)
    layer_equiv = sum(c.lw_steps * c.L for c in todo)  # e2e steps cost ~L layer-steps each
    print(
        f"depth study: {len(plan.chains)} chains in the plan, {len(chains)} in this part, {len(todo)} to do "
        f"({len(chains) - len(todo)} finished)"
    )
    print(
        f"  each chain: stage=all, e2e at equal tokens, eval, e2e at equal wall time, eval: "
        f"{3 * len(todo)} training runs, {2 * len(todo)} evaluations"
    )
    print(
        f"  layer-wise steps {lw:,} + e2e steps {lw:,} at equal tokens ({tok / 1e6:,.1f}M tokens each) + e2e at "
        f"equal wall time (steps from the measured times, at most {plan.wall_cap:g}x); the e2e steps cost about "
        f"{layer_equiv:,} one-layer steps"
    )
    for c in todo:
        print(f"  {c.id:<24} L={c.L:<3} steps {c.lw_steps:>6,}  tokens {c.lw_steps * c.tokens_per_step / 1e6:8.1f}M")


# ---------------------------------------------------------------------------------------------- the corpus
def prepare_corpus(args) -> list[str]:
    """The data overrides: the dummy language for --smoke without --corpus, else data=text on a .txt."""
    if args.corpus is None and args.smoke:
        return ["data=dummy", "data.n_train=256", "data.n_val=32"]
    src = Path(args.corpus or DEFAULT_CORPUS)
    if not src.exists():
        die(f"--corpus {src} does not exist: run `python benchmarks/prepare_corpus.py` first (it writes {src})")
    xz = None
    if src.is_dir() and (src / (CORPUS_TXT + ".xz")).is_file() and not (src / CORPUS_TXT).is_file():
        xz = src / (CORPUS_TXT + ".xz")
    elif src.is_file() and src.name.endswith(".xz"):
        xz = src
    if xz is None:
        return ["data=text", f"data.path={src.resolve()}"]
    out = args.root / "corpus" / xz.name[: -len(".xz")]
    manifest = xz.parent / "manifest.json"
    want = json.loads(manifest.read_text())["sha256"] if manifest.is_file() else None
    if not out.is_file():
        print(f"decompressing {xz} -> {out}", flush=True)
        raw = lzma.decompress(xz.read_bytes())
        got = hashlib.sha256(raw).hexdigest()
        if want and got != want:
            die(f"{xz} decompresses to sha256 {got}, but {manifest} says {want}: prepare the corpus again")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, out)  # unchanged afterwards: the token cache's key holds its size and mtime
        print(f"corpus: {len(raw):,} bytes, sha256 {got}" + (" (as its manifest says)" if want else ""))
    return ["data=text", f"data.path={out.resolve()}"]


def pretokenize(chain: Chain) -> None:
    """Tokenize the corpus once into the shared data.cache_dir, before the workers all want it."""
    from stackwise.data.tokens import load_token_splits

    run = compose(chain.overrides + [f"name={chain.id}"])
    if run.data.name != "dummy":
        splits = load_token_splits(run.data, run.seed, Path(run.data.cache_dir))
        print(f"tokens: {len(splits.train):,} train / {len(splits.val):,} validation sequences of {run.data.seq_len}")


# ---------------------------------------------------------------------------------------------- one chain
def records(root: Path, rel: str) -> dict[str, dict]:
    path = root / rel / "results.json"
    if not path.is_file():
        return {}
    try:
        recs = json.loads(path.read_text())
    except ValueError:
        return {}
    return {str(r.get("stage")): r for r in (recs if isinstance(recs, list) else [])}


def _eval_done(root: Path, rel: str, need: set[str]) -> bool:
    path = root / rel / "eval.json"
    if not path.is_file():
        return False
    try:
        names = {m["name"] for m in json.loads(path.read_text())["models"]}
    except (ValueError, KeyError, TypeError):
        return False
    return need <= names


def _lw_final(recs: dict[str, dict]) -> dict | None:
    return recs.get("finetuned") or recs.get("fused")


def chain_done(root: Path, c: Chain) -> bool:
    return _eval_done(root, c.lw, {"e2e", "fused"}) and _eval_done(root, c.wall, {"e2e"})


def wall_steps(root: Path, c: Chain, wall_cap: float) -> dict:
    """The e2e step budget whose measured time equals the layer-wise run's."""
    from stackwise.report.study import full_seconds, layerwise_seconds

    recs = records(root, c.lw)
    lw_seconds, _ = layerwise_seconds(recs, c.stage_steps)
    e2e_seconds, _ = full_seconds(recs["e2e"], c.lw_steps)  # a resumed e2e: the rate of the steps after it
    per_step = e2e_seconds / c.lw_steps
    steps = max(1, round(lw_seconds / per_step))
    capped = min(steps, round(wall_cap * c.lw_steps))
    return {
        "steps": capped,
        "uncapped_steps": steps,
        "lw_seconds": lw_seconds,
        "e2e_seconds": e2e_seconds,
        "e2e_steps": c.lw_steps,
    }


def _stale(folder: Path) -> bool:
    """results.json lists a stage whose files are gone: the folder came back from --export (small
    files only) to another machine. Nothing in it can be resumed or evaluated."""
    from stackwise.artifacts import ExperimentPaths

    paths, recs = ExperimentPaths(folder), records(folder.parent, folder.name)
    complete = paths.fused_config.name  # a model folder is complete once its config.json is there
    wanted = [paths.layer_ckpt(int(r["k"])) for r in recs.values() if r.get("kind") == "layer"]
    wanted += [d / complete for name, d in (("fused", paths.fused_dir), ("e2e", paths.e2e_dir)) if name in recs]
    return any(not f.is_file() for f in wanted)


def _set_aside(folder: Path) -> None:
    n = 1
    while folder.with_name(f"{folder.name}.stale-{n}").exists():
        n += 1
    folder.rename(folder.with_name(f"{folder.name}.stale-{n}"))
    print(f"{folder} lists stages whose files are gone (copied from another machine?): set aside, started again")


def run_chain(plan: Plan, c: Chain, deadline: float | None) -> None:
    """The chain's steps that are not done yet, in this process."""
    root = plan.root

    def past() -> bool:
        return deadline is not None and time.time() > deadline

    def train(name: str, extra: list[str]) -> None:
        from stackwise.pipeline import Pipeline

        t0 = time.time()
        print(f"[{c.id}] train {name} {' '.join(extra)}", flush=True)
        Pipeline(compose(c.overrides + [f"name={name}", *extra])).execute()
        print(f"[{c.id}] train {name} {' '.join(extra)}: done in {time.time() - t0:.0f} s", flush=True)

    def evaluate(rel: str) -> None:
        from stackwise.artifacts import atomic_write_json
        from stackwise.evaluation import EvalSettings, evaluate_experiment

        t0 = time.time()
        settings = EvalSettings(
            rates=tuple(plan.rates),
            bound_samples=plan.bound_samples,
            max_sequences=plan.eval_sequences,
            device="cuda" if plan.device == "cuda" else "cpu",
        )
        report = evaluate_experiment(root / rel, settings, log=lambda s: print(f"[{c.id}] {s}", flush=True))
        atomic_write_json(report, root / rel / "eval.json")
        print(f"[{c.id}] eval {rel}: done in {time.time() - t0:.0f} s", flush=True)

    if not _eval_done(root, c.lw, {"e2e", "fused"}) and _stale(root / c.lw):
        _set_aside(root / c.lw)
    if not _eval_done(root, c.wall, {"e2e"}) and (root / c.wall).is_dir() and _stale(root / c.wall):
        _set_aside(root / c.wall)
    recs = records(root, c.lw)
    if _lw_final(recs) is None or ("finetuned" not in recs and _finetunes(c)):
        train(c.id, ["stage=all"])
    if not plan.keep_acts:  # the evaluation reads layers/ and the models; the caches are GBs at depth
        for sub in ("acts", "ckpt"):
            shutil.rmtree(root / c.lw / sub, ignore_errors=True)
    if past():
        return
    if "e2e" not in records(root, c.lw):
        train(c.id, ["stage=e2e"])
    if past():
        return
    if not _eval_done(root, c.lw, {"e2e", "fused"}):
        evaluate(c.lw)
        from stackwise.report import write_report

        write_report(root / c.lw)  # the run's own depth report: per-stage validation loss, tokens, time
    if past():
        return
    wall = wall_steps(root, c, plan.wall_cap)
    wall_json = root / c.wall / "wall.json"
    if wall_json.is_file():
        wall = json.loads(wall_json.read_text())  # computed once: a resumed run keeps its budget
    else:
        from stackwise.artifacts import atomic_write_json

        wall_json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(wall, wall_json)
    if "e2e" not in records(root, c.wall):
        print(f"[{c.id}] e2e at equal wall time: {wall['steps']} steps ({wall['lw_seconds']:.0f} s layer-wise)")
        train(f"{c.id}-wall", ["stage=e2e", f"+stages.e2e.trainer.max_steps={wall['steps']}"])
    if past():
        return
    if not _eval_done(root, c.wall, {"e2e"}):
        evaluate(c.wall)
    if not plan.keep_acts:
        shutil.rmtree(root / c.wall / "ckpt", ignore_errors=True)


def _finetunes(c: Chain) -> bool:
    steps = next((o.split("=", 1)[1] for o in c.overrides if o.startswith("fusion.finetune_steps=")), "1")
    return steps != "0"


# ---------------------------------------------------------------------------------------------- running
def run_workers(plan: Plan, chains: list[Chain], jobs: int, deadline: float | None) -> list[str]:
    """Every chain in a worker process, `jobs` at a time; the failures' ids."""
    logs = plan.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # the heaviest first, so that the last to finish is not a long chain started late
    todo = sorted((c for c in chains if not chain_done(plan.root, c)), key=lambda c: -c.lw_steps * c.L)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    failed = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def stop_all(signum, frame):
        for cid, (p, _) in running.items():
            print(f"signal {signum}: stopping {cid} (it resumes next time)", flush=True)
            _stop(p)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    if plan.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
    while todo or running:
        while todo and len(running) < jobs and not (deadline and time.time() > deadline):
            c = todo.pop(0)
            log = open(logs / f"{c.id}.log", "a")  # noqa: SIM115 (closed when the worker ends)
            cmd = [sys.executable, __file__, "--worker", c.id, "--root", str(plan.root)]
            if deadline:
                cmd += ["--worker-deadline", str(deadline)]
            running[c.id] = (
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True),
                log,
            )
            print(f"started {c.id} (log: {logs / (c.id + '.log')})", flush=True)
        if deadline and time.time() > deadline and not running:
            break
        if deadline and time.time() > deadline + 5:
            for cid, (p, _) in running.items():
                print(f"deadline: stopping {cid} (it resumes next time)", flush=True)
                _stop(p)
        time.sleep(1.0)
        for cid, (p, log) in list(running.items()):
            if p.poll() is not None:
                log.close()
                del running[cid]
                ok = p.returncode == 0
                print(f"{'finished' if ok else 'FAILED'} {cid} (exit {p.returncode})", flush=True)
                if not ok and not (deadline and time.time() > deadline):
                    failed.append(cid)
        if deadline and time.time() > deadline:
            todo.clear()
    return failed


def _stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exit_with_parent() -> None:
    """A worker ends when the study process that started it does (killed by a time limit, say):
    its session is its own, so nothing else would stop it. What it leaves resumes next time."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def worker(root: Path, cid: str, deadline: float | None) -> None:
    _exit_with_parent()
    plan = load_plan(root)
    chain = next((c for c in plan.chains if c.id == cid), None)
    if chain is None:
        die(f"--worker {cid}: no such chain in {root / 'study.json'}")
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")  # the pipeline's progress lines
    run_chain(plan, chain, deadline)


def load_plan(root: Path) -> Plan:
    path = root / "study.json"
    if not path.is_file():
        die(f"{path} does not exist: run the study first (its plan is written there)")
    return Plan.from_json(root, json.loads(path.read_text()))


def export(root: Path, dest: Path) -> None:
    """The small files of the study (no weights, no caches) to `dest`, as laid out under root."""
    n = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0] in ("tokens", "corpus") or ".stale-" in str(rel):
            continue
        small = p.name in (
            "results.json",
            "eval.json",
            "run_config.json",
            "wall.json",
            "study.json",
            "report.md",
            "samplers.json",
        )
        small = small or p.name == "depth.png"
        if small or rel.parts[0] == "logs" or (len(rel.parts) == 1 and p.suffix in (".md", ".png")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / rel)
            n += 1
    print(f"exported {n} files to {dest}")


def write_report(root: Path) -> None:
    from stackwise.report.study import write_study_report

    md, pngs = write_study_report(root)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md}" + "".join(f"\nwrote {p}" for p in pngs))


def die(msg: str) -> None:
    print(f"depth_study: {msg}", file=sys.stderr)
    sys.exit(2)


SMOKE = dict(
    depths=[2, 3],
    budgets=[1.0],
    steps=4,
    finetune_steps=2,
    d_model=32,
    n_heads=2,
    n_kv_heads=1,
    d_ff=64,
    seq_len=32,
    batch_size=8,
    val_every=4,
    bound_samples=1,
    eval_sequences=8,
    wall_cap=2.0,
    set=["logger=none", "callbacks=none", "fusion.check=false", "optim.warmup_steps=1", "cache.batch_size=64"],
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:8]),
    )
    p.add_argument("--root", type=Path, default=REPO / "outputs" / "depth-study", help="the study's folder")
    p.add_argument("--corpus", default=None, help="prepare_corpus.py's folder or .txt.xz, or any data=text path")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="hardware=gpu or hardware=cpu")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16], help="model.n_layers values (4 8 16)")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 4.0], help="budget multiples (1 4)")
    p.add_argument("--steps", type=int, default=200, help="steps of a layer stage at budget 1 (200)")
    p.add_argument("--finetune-steps", type=int, default=80, help="fusion fine-tune steps at budget 1 (80)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (0; 0 1 2 where a gap is within noise)")
    p.add_argument(
        "--levers",
        nargs="*",
        default=[],
        metavar='NAME="OVERRIDES"',
        help='named sets of overrides, each a chain beside `base`: top1="layerwise.top_layers=1"; {L} is '
        'replaced by the depth: perlayer="masking=per_layer cache.views={L}"',
    )
    p.add_argument("--no-base", action="store_true", help="leave out the `base` chains (the defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE", help="overrides for every run")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=None, help="default: 2.75 x d_model, rounded to 8")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="data.val_fraction: the held-out tail of the windows (0.01 of 39 MB: 391 kB, 1,527 windows of 256)",
    )
    p.add_argument("--val-every", type=int, default=100, help="trainer.val_check_interval (and checkpoints)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.15, 0.5, 0.9])
    p.add_argument("--bound-samples", type=int, default=4, help="bound draws per validation sequence (4)")
    p.add_argument("--eval-sequences", type=int, default=None, help="first N validation sequences (all)")
    p.add_argument(
        "--wall-cap", type=float, default=8.0, help="e2e at equal wall time: at most this x the equal-token steps (8)"
    )
    p.add_argument("--keep-acts", action="store_true", help="keep the activation caches (deleted after training)")
    p.add_argument(
        "--samplers",
        type=int,
        default=0,
        metavar="N",
        help="then score stackwise-generate's samplers on each finished chain's models (benchmarks/samplers.py, "
        "N samples per setting and model; once per chain: runs/<id>/samplers.json); with --report-only too",
    )
    p.add_argument("--sampler-settings", default=None, help="samplers.py --settings (default: every setting)")
    p.add_argument("--jobs", type=int, default=1, help="chains side by side, each a worker process; 0 = in this one")
    p.add_argument("--part", default=None, help="i/n: every n-th chain (heaviest first), for one device command")
    p.add_argument("--deadline", type=float, default=None, help="seconds: stop the workers then, write the table")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimate, run nothing")
    p.add_argument("--report-only", action="store_true", help="write the table and plots from what --root holds")
    p.add_argument("--export", type=Path, default=None, help="copy the small files (no weights) here at the end")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, the shipped corpus: seconds")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.root.resolve(), args.worker, args.worker_deadline)
    if args.smoke:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
        if "device" not in given:
            args.device = "cpu"
    args.root = args.root.resolve()
    if args.smoke and args.jobs <= 0:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: one thread is the fastest, and threads fighting for cores are slow
        try:
            return _main(args)
        finally:
            torch.set_num_threads(threads)
    return _main(args)


def score_samplers(root: Path, device: str, n: int, settings: str | None) -> None:
    """benchmarks/samplers.py on every finished chain's models that has no samplers.json yet."""
    from stackwise.report.study import SAMPLERS_JSON

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import samplers  # benchmarks/samplers.py

    for c in load_plan(root).chains:
        folder, out = root / c.lw, root / c.lw / SAMPLERS_JSON
        if out.is_file() or not _eval_done(root, c.lw, {"e2e", "fused"}):
            continue
        t0 = time.time()
        argv = [str(folder), "--device", device, "--num-samples", str(n), "--out", str(out)]
        samplers.main(argv + (["--settings", settings] if settings else []))
        print(f"[{c.id}] samplers scored in {time.time() - t0:.0f} s", flush=True)


def _main(args) -> None:
    if args.report_only:
        if args.samplers > 0:
            score_samplers(args.root, args.device, args.samplers, args.sampler_settings)
        write_report(args.root)
        if args.export:
            export(args.root, args.export)
        return
    t0 = time.time()
    deadline = t0 + args.deadline if args.deadline else None
    args.root.mkdir(parents=True, exist_ok=True)
    with _user_errors():
        plan = build_plan(args, prepare_corpus(args))
        size_plan(plan)
    chains = select_part(plan.chains, args.part)
    print_estimate(plan, chains, args.root)
    if args.dry_run:
        return
    old = args.root / "study.json"
    if old.is_file():  # another part's chains stay in the plan
        known = {c.id for c in plan.chains}
        plan.chains = plan.chains + [c for c in load_plan(args.root).chains if c.id not in known]
    tmp = old.with_name("study.json.tmp")
    tmp.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    os.replace(tmp, old)
    if not chains:
        print(f"--part {args.part}: no chain falls in this part")
        return
    with _user_errors():
        pretokenize(chains[0])
    failed: list[str] = []
    if args.jobs <= 0:
        for c in chains:
            if not chain_done(args.root, c):
                run_chain(plan, c, deadline)
    else:
        failed = run_workers(plan, chains, args.jobs, deadline)
    left = [c.id for c in chains if not chain_done(args.root, c)]
    print(f"depth study: {len(chains) - len(left)}/{len(chains)} chains of this part done in {time.time() - t0:.0f} s")
    if left:
        print(f"not finished (run the same command again to resume): {', '.join(left)}")
    if args.samplers > 0 and (deadline is None or time.time() < deadline):
        score_samplers(args.root, args.device, args.samplers, args.sampler_settings)
    write_report(args.root)
    if args.export:
        export(args.root, args.export)
    if failed:
        die(f"{len(failed)} chains failed: {', '.join(failed)} (see {args.root / 'logs'})")


class _user_errors:
    """A StackWiseError (a bad override, a missing corpus) is one line and exit status 2."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from stackwise.errors import StackWiseError

        if exc is not None and isinstance(exc, StackWiseError):
            die(str(exc))
        if exc is not None and os.environ.get("STACKWISE_DEBUG"):
            traceback.print_exception(kind, exc, tb)
        return False


if __name__ == "__main__":
    main()
