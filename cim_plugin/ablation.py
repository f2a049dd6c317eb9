"""The ablation runner: plugin variants × seeds (× learners) at the same memory budget.

Each run is a normal PyCIL run (``main.py`` in the patched checkout) of a config derived from
the user's JSON: the variant sets ``cim`` / ``cim_mask`` / ``cim_codec`` / ``cim_memory`` only (the
``features`` variant: the adapted feature memory; ``pca``: the PCA-coded stage maps; ``frozen``: plugin
off with the backbone below ``cim_feature_stage`` frozen after the first phase, what ``pca``'s
freezing alone costs; these three iCaRL and LUCIR; ``frozen`` also sets ``cim_freeze_lower``), the seed sets ``seed`` and
``prefix`` only, so every run of a learner has the same memory budget and schedule.

Output folder layout::

    <out>/runs/<learner>_<variant>_s<seed>/config.json    the derived PyCIL config
                                          /pycil.log      PyCIL's whole output
                                          /results.json   the run's results (see pycil/results.py)
                                          /gallery.npz    exemplar gallery (plugin variants)
    <out>/runs.csv, aggregate.csv, aggregate.md, figures/*.png   (ablation_report.py)

Shared first phase (``shared_first_phase``, the CLI's default): for each learner and seed the
``off`` run trains phase 0 and writes its checkpoint (``cim_checkpoint``), copied to
``runs/<learner>_off_s<seed>/first_phase.pt``; every other variant of that learner and seed starts
from it (``cim_first_phase_from``, see pycil/first_phase.py) and builds its own memory from the
same model, so the table compares memories rather than first-phase luck. The report then splits
the gain into the first phase (identical by construction) and the later phases, and gives old-
and new-class accuracy per phase. ``shared_first_phase=False`` runs every variant independently.

Resuming: a run whose ``results.json`` says ``finished`` and whose ``config.json`` equals the
planned config is skipped; any other run (never started, crashed, killed) is run again: from the
start, or, if it writes checkpoints (the ``off`` run of a shared first phase, or every run when the
config sets ``cim_checkpoint``), from its last finished phase (``cim_resume``; the tag keeps another
setting's files apart, so only the same setting's phases are restored). A finished run made with
another config is an error unless ``force`` is given (then it is run again), so results of different
settings never mix in one table.

Side by side (``jobs`` > 1, see side_by_side.py): up to ``jobs`` runs at once, each with its share of
the cores as torch threads; a variant waits for its off run's phase-0 checkpoint (copied as soon as
the run logs it), not for the whole off run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tqdm import tqdm

from .ablation_report import report, variant_rank
from .atomic import atomic_open
from .config import ABLATION_VARIANTS, variant_keys
from .launch import RunError, available_cores, patched_pycil_root, run_pycil, sigterm_raises
from .side_by_side import GateClosed, Task, run_side_by_side

log = logging.getLogger(__name__)

#: The variants in table order: plain exemplars, then the mask sources of CIM's ablation.
VARIANTS = ABLATION_VARIANTS


class AblationError(RuntimeError):
    """A problem with the ablation's inputs or its output folder (message says what to fix)."""


@dataclass(frozen=True)
class RunSpec:
    learner: str
    variant: str
    seed: int
    config: dict

    @property
    def name(self) -> str:
        return f"{self.learner}_{self.variant}_s{self.seed}"


# ------------------------------------------------------------------------------------ planning


def load_config(path: str | Path, pycil_root: Path | None = None) -> dict:
    """A PyCIL JSON as a dict; a relative path not found here is also tried in the PyCIL checkout."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and pycil_root is not None and (pycil_root / p).is_file():
        p = pycil_root / p
    if not p.is_file():
        raise AblationError(f"config file {path} not found")
    try:
        config = json.loads(p.read_text())
    except json.JSONDecodeError as err:  # file:line:column, as compilers and PyCIL's patched main.py say it
        raise AblationError(f"config file {p}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AblationError(f"config file {p} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AblationError(f"config file {p} must hold a JSON object of PyCIL keys")
    for key in ("model_name", "dataset"):
        if not isinstance(config.get(key), str):
            raise AblationError(f"config file {p} has no string '{key}'")
    return config


#: File in the off run's folder holding its phase-0 checkpoint (shared first phase).
FIRST_PHASE_FILE = "first_phase.pt"


def run_dir_of(out: Path, learner: str, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / RunSpec(learner, variant, seed, {}).name


def variant_config(base: dict, variant: str, seed: int, first_phase: Path | None = None,
                   trained_here: bool = True) -> dict:
    """The base config with the variant's plugin switches and one seed; nothing else changes.
    ``first_phase``: the shared phase-0 checkpoint (shared-first-phase mode): the off run writes
    it (``cim_checkpoint``), the other variants start from it (``cim_first_phase_from``); with
    ``trained_here`` False another ablation wrote it and every variant, off too, starts from it."""
    try:
        keys = variant_keys(variant)
    except ValueError as err:
        raise AblationError(str(err)) from None
    # the variant decides what the memory keeps (``features`` / ``pca`` set it; the others keep images)
    config = {k: v for k, v in base.items() if k not in ("config", "logfilename", "cim_first_phase_from", "cim_memory")}
    config["seed"] = [int(seed)]
    config.update(keys if keys is not None else {"cim": False})
    if first_phase is not None:
        if variant == "off" and trained_here:
            config["cim_checkpoint"] = True
        else:
            config["cim_first_phase_from"] = str(first_phase)
    if config.get("cim_checkpoint"):  # a killed run goes on from its last phase when run again
        config["cim_resume"] = True
    config["prefix"] = f"ablation_{variant}_{config_tag(config)}"
    return config


#: Keys of a derived config that say how it is run, not what it learns: left out of the tag and of
#: the comparison with a finished run's config (folders of ablations made before they were set stay valid).
HOW_KEYS = ("prefix", "cim_resume")


def same_setting(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in HOW_KEYS} == {k: v for k, v in b.items() if k not in HOW_KEYS}


def config_tag(config: dict) -> str:
    """8 hex digits of the config's sha256 (its ``prefix`` left out). PyCIL names its log, results
    and checkpoint files by prefix, seed and backbone under ``logs/<learner>/<dataset>/...``: with
    the tag in the prefix, ablations of different settings (or output folders) never share those
    files, while a re-run of the same planned config finds its own checkpoints again."""
    body = {k: v for k, v in config.items() if k not in HOW_KEYS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:8]


def plan(configs: Sequence[dict], variants: Sequence[str], seeds: Sequence[int],
         shared_first_phase_in: Path | None = None, first_phase_from: Path | None = None) -> list[RunSpec]:
    """Runs in order learner → variant → seed; one config per learner. ``shared_first_phase_in``:
    the ablation's output folder, for the shared-first-phase mode (see the module docstring).
    ``first_phase_from``: another ablation's output folder whose off runs' first phases every run
    here starts from (its ``runs/<learner>_off_s<seed>/first_phase.pt`` must exist)."""
    if not configs or not variants or not seeds:
        raise AblationError("an ablation needs at least one config, one variant and one seed")
    if shared_first_phase_in is not None and first_phase_from is not None:
        raise AblationError("the first phases are either trained here (shared) or taken from another ablation, not both")
    if shared_first_phase_in is not None and "off" not in variants:
        raise AblationError("a shared first phase is trained by the 'off' variant: add it to the variants "
                            "(or run the variants independently)")
    learners = [str(c["model_name"]).lower() for c in configs]
    dupes = sorted({name for name in learners if learners.count(name) > 1})
    if dupes:
        raise AblationError(f"one config per learner: {', '.join(dupes)} given more than once")
    if len(set(variants)) != len(variants) or len(set(seeds)) != len(seeds):
        raise AblationError("variants and seeds must not repeat")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise AblationError(f"seed {seed!r} must be an integer >= 0")
    source = shared_first_phase_in if shared_first_phase_in is not None else first_phase_from

    def first_phase(learner: str, seed: int) -> Path | None:
        return None if source is None else (run_dir_of(source, learner, "off", seed) / FIRST_PHASE_FILE).resolve()

    if first_phase_from is not None:
        missing = [str(first_phase(learner, seed)) for learner in learners for seed in seeds
                   if not first_phase(learner, seed).is_file()]
        if missing:
            raise AblationError(f"no first phase in {first_phase_from} for {len(missing)} learner/seed pair(s): "
                                + ", ".join(missing) + " (its off runs write them in shared-first-phase mode)")
    return [
        RunSpec(learner, variant, seed, variant_config(config, variant, seed, first_phase(learner, seed),
                                                       trained_here=first_phase_from is None))
        for learner, config in zip(learners, configs)
        for variant in sorted(variants, key=variant_rank)
        for seed in seeds
    ]


#: Keys not compared by ``first_phase_differences``: the variant's, the seed's, and how a run is run.
_NOT_SETTING = frozenset({*HOW_KEYS, "seed", "cim", "cim_mask", "cim_codec", "cim_memory", "cim_freeze_lower",
                          "cim_checkpoint", "cim_first_phase_from"})


def first_phase_differences(configs: Sequence[dict], first_phase_from: Path) -> list[str]:
    """What the setting of each learner here changes against the ablation whose first phases it
    starts from (that ablation's off run of the same learner, first seed found): "learner: key there
    -> here" per differing key. The first phase is only loaded; the keys that decide how it was
    trained are for the user to judge (a smaller memory_size, another codec: fine; other init_epochs:
    not the same experiment)."""
    lines = []
    for config in configs:
        learner = str(config["model_name"]).lower()
        found = sorted(Path(first_phase_from, "runs").glob(f"{learner}_off_s*/config.json"))
        if not found:
            continue
        there = json.loads(found[0].read_text())
        here = variant_config(config, "off", 0)
        for key in sorted((set(there) | set(here)) - _NOT_SETTING):
            if there.get(key) != here.get(key):
                lines.append(f"{learner}: {key} {there.get(key, '(unset)')!r} -> {here.get(key, '(unset)')!r}")
    return lines


def check_plan(specs: Iterable[RunSpec]) -> None:
    """Validate every derived config with the plugin's own checks before any run starts."""
    from .config import ConfigError
    from .pycil.hook import check_args

    problems = []
    for spec in specs:
        # the shared first phase is written by the off run of the same ablation: checked when used
        config = {k: v for k, v in spec.config.items() if k != "cim_first_phase_from"}
        try:
            check_args({**config, "seed": spec.seed})  # PyCIL hands each run one seed
        except ConfigError as err:
            problems.append(f"{spec.name}: " + "; ".join(err.problems))
    if problems:
        raise AblationError("config problems:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------- running


def run_state(run_dir: Path, config: dict) -> str:
    """"done", "stale" (finished with another config), or "todo"."""
    results, saved = run_dir / "results.json", run_dir / "config.json"
    try:
        finished = json.loads(results.read_text()).get("finished") is True
        same = same_setting(json.loads(saved.read_text()), config)
    except (OSError, ValueError, AttributeError):
        return "todo"
    if not finished:
        return "todo"
    return "done" if same else "stale"


#: Beside a run's config: the PyCIL checkout it ran in, where PyCIL keeps the checkpoints it resumes from.
ROOT_FILE = "pycil_root.txt"


def resume_root(run_dir: Path) -> Path | None:
    """The PyCIL checkout an earlier attempt of this run ran in (None if never started or not recorded)."""
    try:
        return Path((run_dir / ROOT_FILE).read_text().strip())
    except OSError:
        return None


def execute(specs: Sequence[RunSpec], out: Path, root: Path, force: bool = False, echo: Callable | None = None,
            runner: Callable = run_pycil, jobs: int = 1) -> dict[str, list[str]]:
    """Run what is not done yet, up to ``jobs`` runs at once, one progress bar over all runs; returns
    run names by outcome ("skipped", "ran", "failed"). A failed run is reported and the others still
    run; each list is in plan order. A variant that starts from a shared first phase waits for its
    ``off`` run's phase-0 checkpoint, not for the whole off run (if the off run fails before it, the
    variant fails without running). With ``jobs`` > 1 each run gets ``run_threads(jobs)`` torch threads."""
    out = Path(out)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise AblationError(f"jobs must be an integer >= 1, got {jobs!r}")
    states = {s.name: run_state(out / "runs" / s.name, s.config) for s in specs}
    here = Path(root).resolve()
    moved = [f"{s.name} (PyCIL at {was})" for s in specs if states[s.name] == "todo" and s.config.get("cim_resume")
             and (was := resume_root(out / "runs" / s.name)) is not None and was != here]
    if moved:
        raise AblationError(
            f"{len(moved)} unfinished run(s) in {out} keep the checkpoints they resume from under another PyCIL "
            f"checkout than {here}: {', '.join(moved[:4])}{' ...' if len(moved) > 4 else ''}. "
            "Set PYCIL_ROOT to that checkout to resume them, or delete their run folders to start them again"
        )
    stale = [n for n, st in states.items() if st == "stale"]
    if stale and not force:
        raise AblationError(
            f"{len(stale)} finished run(s) in {out} were made with another config ({', '.join(stale[:4])}"
            f"{' ...' if len(stale) > 4 else ''}): use another --out, or --force to run them again"
        )
    outcome: dict[str, list[str]] = {"skipped": [n for n, st in states.items() if st == "done"], "ran": [], "failed": []}
    todo = {s.name: s for s in specs if states[s.name] != "done"}
    bar = tqdm(total=len(specs), initial=len(outcome["skipped"]), desc="ablation", unit="run", dynamic_ncols=True)
    children: list = []  # the PyCIL processes, stopped by this (main) thread on Ctrl-C / SIGTERM
    env = {} if jobs == 1 else run_threads(jobs)
    running: dict[str, str] = {}  # run name -> where it is ("task 1 epoch 3/12"), shown after the bar
    running_lock = threading.Lock()

    def show(name: str, where: str | None) -> None:
        with running_lock:
            if running.get(name) == where:  # PyCIL's bar repeats an epoch's line; redraw only on a change
                return
            if where is None:
                running.pop(name, None)
            else:
                running[name] = where
            bar.set_postfix_str("; ".join(f"{n} {w}".rstrip() for n, w in running.items()))

    def task(spec: RunSpec) -> Task:
        off = RunSpec(spec.learner, "off", spec.seed, {}).name
        here = (run_dir_of(out, spec.learner, "off", spec.seed) / FIRST_PHASE_FILE).resolve()  # this ablation's off run's

        def line_echo(line: str, name: str = spec.name) -> None:
            where = run_progress(line)
            if where is not None:
                show(name, where)
            if echo is not None:
                echo(line if jobs == 1 else f"[{name}] {line}")

        waits = off if spec.config.get("cim_first_phase_from") == str(here) and off in todo else None
        return Task(spec.name, lambda opened: _run_one(spec, out / "runs" / spec.name, root, line_echo, runner, opened,
                                                       env=env, on_start=children.append), waits)

    def started(task: Task) -> None:
        show(task.name, "")
        if jobs > 1:
            tqdm.write(f"[ablation] {task.name} started")

    def ended(task: Task, wall: float | None, error: BaseException | None) -> None:
        show(task.name, None)
        bar.update(1)
        if isinstance(error, (RunError, GateClosed)):
            outcome["failed"].append(task.name)
            tqdm.write(f"[ablation] {task.name} FAILED: {error}")
        elif error is not None:
            raise error
        else:
            outcome["ran"].append(task.name)
            tqdm.write(f"[ablation] {task.name} done in {wall:.0f} s")

    def stop() -> None:
        for child in children:
            if child.poll() is None:
                child.kill()

    try:
        with sigterm_raises():
            run_side_by_side([task(s) for s in todo.values()], jobs, started, ended, stop)
    finally:
        bar.close()
    order = {s.name: i for i, s in enumerate(specs)}  # plan order, whatever order the runs ended in
    return {kind: sorted(names, key=order.__getitem__) for kind, names in outcome.items()}


def run_threads(jobs: int) -> dict[str, str]:
    """Environment of each of ``jobs`` runs side by side: the machine's cores shared out (at least one
    thread each), unless the user set OMP_NUM_THREADS, which then applies to every run."""
    if os.environ.get("OMP_NUM_THREADS"):
        return {}
    threads = str(max(1, available_cores() // jobs))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def pycil_checkpoint(results_file: str | Path, task: int) -> Path:
    """The checkpoint of ``task`` that a run with ``cim_checkpoint`` wrote beside its results file
    (pycil/checkpoint.py: ``<log name>_ckpt/task_<k>.pt``)."""
    return Path(str(results_file).removesuffix("_results.json") + "_ckpt") / f"task_{task}.pt"


#: PyCIL's per-epoch progress line of every learner ("Task 1, Epoch 3/12 => Loss ..."; FOSTER's
#: compression stage prefixes "SNet: ").
EPOCH_LINE = re.compile(r"(SNet: )?Task (\d+), Epoch (\d+)/(\d+)")


def run_progress(line: str) -> str | None:
    """Where a PyCIL run is, read off one line of its output ("task 1 epoch 3/12"), or None."""
    found = EPOCH_LINE.search(line)
    if found is None:
        return None
    return f"task {found[2]} epoch {found[3]}/{found[4]}" + (" (compression)" if found[1] else "")


#: The checkpoint mixin's log line once phase 0 is on disk (written, or found again on resuming).
FIRST_PHASE_LINE = re.compile(r"cim-plugin: (?:checkpoint of task 0 written to|resumed task 0 from) (.+?) \(state sha256")


def _run_one(spec: RunSpec, run_dir: Path, root: Path, echo, runner, opened: Callable[[], None] = lambda: None,
             **runner_options) -> float:
    """One PyCIL run into ``run_dir``. The shared first phase (the ``off`` run's phase-0 checkpoint)
    is copied to ``run_dir/first_phase.pt`` as soon as the run logs it, and ``opened()`` is called,
    so that the variants waiting for it can start; again, as a check, once the run has finished."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "gallery.npz", FIRST_PHASE_FILE):  # leftovers of a crashed or stale run
        (run_dir / name).unlink(missing_ok=True)
    config_path = run_dir / "config.json"
    with atomic_open(config_path, "w") as f:
        json.dump(spec.config, f, indent=2)
    with atomic_open(run_dir / ROOT_FILE, "w") as f:  # a resumed attempt must find its checkpoints there
        f.write(f"{Path(root).resolve()}\n")
    shares_first_phase = spec.variant == "off" and bool(spec.config.get("cim_checkpoint"))

    def share(checkpoint: Path) -> None:
        with atomic_open(run_dir / FIRST_PHASE_FILE, "wb") as f, open(checkpoint, "rb") as src:
            shutil.copyfileobj(src, f)
        opened()

    def watch(line: str) -> None:
        found = FIRST_PHASE_LINE.search(line) if shares_first_phase else None
        if found and not (run_dir / FIRST_PHASE_FILE).is_file():
            try:
                share(Path(root) / found.group(1))
            except OSError as err:  # the copy at the end of the run decides
                log.warning("cannot share the first phase of %s yet: %s", spec.name, err)
        if echo is not None:
            echo(line)

    results_file, wall = runner(root, config_path, run_dir / "pycil.log", watch, **runner_options)
    try:
        results = json.loads(Path(results_file).read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"results file {results_file} of {spec.name} unreadable: {err}") from None
    if results.get("finished") is not True:
        raise RunError(f"results file {results_file} of {spec.name} is not marked finished")
    gallery = Path(str(results_file).removesuffix("_results.json") + "_gallery.npz")
    if gallery.is_file():
        shutil.copyfile(gallery, run_dir / "gallery.npz")
    if shares_first_phase:
        first = pycil_checkpoint(results_file, 0)
        if not first.is_file():
            raise RunError(f"{spec.name} wrote no phase-0 checkpoint {first} for the shared first phase")
        if not (run_dir / FIRST_PHASE_FILE).is_file():  # not copied yet when the run logged it
            share(first)
    results["ablation"] = {"learner": spec.learner, "variant": spec.variant, "seed": spec.seed,
                           "shared_first_phase": bool(spec.config.get("cim_first_phase_from") or spec.config.get("cim_checkpoint")),
                           "launcher_wall_s": round(wall, 2), "pycil_results_file": str(results_file)}
    with atomic_open(run_dir / "results.json", "w") as f:  # written last: marks the run done
        json.dump(results, f, indent=2)
    return wall


def run_ablation(config_paths: Sequence[str | Path], variants: Sequence[str] = VARIANTS, seeds: Sequence[int] = (1993,),
                 out: str | Path = "cim_ablation", root: Path | None = None, force: bool = False,
                 echo: Callable | None = None, figures: bool = True,
                 shared_first_phase: bool = True, jobs: int = 1,
                 first_phase_from: str | Path | None = None, checkpoints: bool = False) -> tuple[dict, dict]:
    """Plan, validate, run what is missing, report. Returns (outcomes by kind, written files).
    ``first_phase_from``: start every run from another ablation's first phases (see ``plan``).
    ``checkpoints``: every run writes a checkpoint per phase (``cim_checkpoint``, as if the JSON set
    it: the same runs, the same folders), for the tools that read a run's networks afterwards."""
    try:
        root = patched_pycil_root(root)
    except RunError as err:
        raise AblationError(str(err)) from None
    configs = [load_config(p, Path(root)) for p in config_paths]
    if checkpoints:
        configs = [{**config, "cim_checkpoint": True} for config in configs]
    out = Path(out)
    source = None if first_phase_from is None else Path(first_phase_from)
    if source is not None and not shared_first_phase:
        raise AblationError("independent runs train their own first phases: leave out the first phases of another ablation")
    if source is not None and source.resolve() == out.resolve():
        raise AblationError(f"the first phases must come from another ablation's folder than {out}")
    specs = plan(configs, variants, seeds, out if shared_first_phase and source is None else None, source)
    check_plan(specs)
    side = ""
    if jobs > 1:
        threads = run_threads(jobs).get("OMP_NUM_THREADS") or f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
        side = f"; up to {jobs} runs at a time, {threads} torch thread(s) each"
    print(f"[ablation] {len(specs)} runs ({len(configs)} learner(s) × {len(variants)} variant(s) × {len(seeds)} seed(s)) "
          f"in {out}; PyCIL at {root}; "
          + (f"first phases from {source}" if source is not None else
             "first phase shared per learner and seed (trained by 'off')" if shared_first_phase else "independent runs")
          + side, flush=True)
    if source is not None:
        differences = first_phase_differences(configs, source)
        print(f"[ablation] setting here against {source}: "
              + ("the same" if not differences else "\n  " + "\n  ".join(differences)), flush=True)
    outcome = execute(specs, out, Path(root), force=force, echo=echo, jobs=jobs)
    written = report(out, figures=figures) if (outcome["ran"] or outcome["skipped"]) else {}
    if "aggregate.md" in written:
        print(written["aggregate.md"].read_text())
    print(f"[ablation] ran {len(outcome['ran'])}, skipped {len(outcome['skipped'])} already finished, "
          f"failed {len(outcome['failed'])}" + (f": {', '.join(outcome['failed'])}" if outcome["failed"] else ""))
    for name, path in written.items():
        print(f"[ablation] wrote {path}")
    return outcome, written
