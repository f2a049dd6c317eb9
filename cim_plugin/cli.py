"""The ``cim-plugin`` command (also ``python -m cim_plugin.cli``).

Subcommands:
  patch PYCIL_DIR   patch a PyCIL checkout and link the plugin's exps (logic: cim_plugin.patching)
  where             say which PyCIL checkout the plugin finds and whether it is patched
  demo              plugin off vs on on the synthetic set (logic: cim_plugin.demo)
  ablate CONFIG...  variants × seeds (× learners) at the same budget, resumable (cim_plugin.ablation)
  report OUT        tables and figures of an ablation folder again (cim_plugin.ablation)

Adding a subcommand (e.g. ``demo``):
  1. put its logic in its own module (``cim_plugin/demo.py``), raising ``UserError`` (or an error
     the handler turns into one) for anything the user must fix;
  2. here, write ``_add_demo(sub)`` that declares it with ``_subcommand(sub, "demo", _run_demo, help=...)``
     and adds its arguments, and ``_run_demo(args) -> int``, whose docstring is the command's
     description, that imports the module *inside* the function (so that ``cim-plugin where``
     never pays for importing torch) and calls it;
  3. append ``_add_demo`` to ``SUBCOMMANDS``.
``main`` prints a ``UserError`` as ``cim-plugin <command>: error: <message>`` on stderr and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Iterator


class UserError(Exception):
    """A problem the user can fix; ``main`` prints the message and exits with status 2."""


def _echo(line: str) -> None:
    """Print a line of a PyCIL run as it comes (``--verbose``)."""
    print(line, end="", flush=True)


@contextlib.contextmanager
def _user_errors(*errors: type[Exception]) -> Iterator[None]:
    """Within the block, ``errors`` (a module's errors for problems the user can fix) are UserErrors."""
    try:
        yield
    except errors as err:
        raise UserError(str(err)) from None


def _subcommand(sub, name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
    """Declare the subcommand ``name``, carried out by ``run(args) -> exit status``, whose docstring
    is the description ``--help`` prints; returns its parser, for its arguments."""
    p = sub.add_parser(name, help=help, description=" ".join((run.__doc__ or "").split()))
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------- patch


def _add_patch(sub) -> None:
    p = _subcommand(sub, "patch", _run_patch, help="patch a PyCIL checkout for cim-plugin (safe to run again)")
    p.add_argument("pycil_dir", metavar="PYCIL_DIR", help="the top folder of your PyCIL git clone")


def _run_patch(args) -> int:
    """Apply cim-plugin's patches/ to a git checkout of PyCIL at the pinned commit, link the
    plugin's exps/*.json into its exps/ folder and record where it is. Checks everything first
    and changes nothing if a check fails; running it again changes nothing."""
    from cim_plugin import patching

    try:
        report = patching.patch_pycil(args.pycil_dir)
    except patching.PatchError as err:
        raise UserError(str(err)) from None
    except OSError as err:  # e.g. no permission to write into the checkout
        raise UserError(f"{err.strerror or err}: {err.filename or args.pycil_dir}") from None
    print(patching.format_report(report))
    return 0


# ------------------------------------------------------------------------------------- where


def _add_where(sub) -> None:
    _subcommand(sub, "where", _run_where, help="show the PyCIL checkout cim-plugin uses and whether it is patched")


def _run_where(args) -> int:
    """Show the PyCIL checkout cim-plugin finds (PYCIL_ROOT, else the one recorded by
    `cim-plugin patch`), its commit and whether it is patched. Exits with status 1 if none is found."""
    from cim_plugin import locate, patching

    root, reason = locate.find_pycil_root()
    if root is None:
        print(reason, file=sys.stderr)
        return 1
    if os.environ.get(locate.ENV_VAR, "").strip():
        source = f"from {locate.ENV_VAR}"
    else:
        source = f"recorded in {locate.show_path(locate.config_file())}"
    print(patching.describe(root, source))
    return 0


# ------------------------------------------------------------------------------ demo, ablate


def _add_run_options(p, variants: tuple[str, ...], out: str, out_help: str) -> None:
    """The options of the subcommands that run PyCIL (demo, ablate): the variants to run (default
    ``variants``), first phases shared or not, the output folder (default ``out``), echo or not."""
    from cim_plugin.config import ABLATION_VARIANTS, variant_keys

    def variant(name: str) -> str:
        try:
            variant_keys(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return name

    p.add_argument("--variants", nargs="+", default=list(variants), type=variant,
                   help="variants to run per learner: " + ", ".join(ABLATION_VARIANTS)
                        + ", features, pca, frozen (plugin off, the backbone below cim_feature_stage frozen after the "
                        "first phase; these three: iCaRL, LUCIR)"
                        + ", or a mask source + a pixel codec such as pau+jpeg; @q after a codec sets its quality "
                        "(mrdc@30, pau+jpeg@75) (default: " + " ".join(variants) + ")")
    p.add_argument("--independent", action="store_true",
                   help="train every variant's first phase itself (default: the 'off' run of each learner and seed "
                        "trains phase 0 once and every variant starts from that model, building its own memory)")
    p.add_argument("--out", default=out, help=f"{out_help} (default: ./{out})")
    p.add_argument("--verbose", action="store_true", help="echo PyCIL's output while it runs")

    def jobs(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"--jobs takes an integer >= 1, got {text!r}")
        return int(text)

    p.add_argument("--jobs", type=jobs, default=1,
                   help="PyCIL runs at a time (default 1), each with cores / jobs torch threads unless OMP_NUM_THREADS "
                        "is set; a variant starts as soon as its off run's first phase is on disk")


def _add_demo(sub) -> None:
    from cim_plugin.config import SUPPORTED_LEARNERS

    p = _subcommand(sub, "demo", _run_demo,
                    help="plugin off vs on on the built-in synthetic set, printing the comparison")
    p.add_argument("--learners", nargs="+", default=["icarl"], choices=list(SUPPORTED_LEARNERS),
                   help="learners to compare (default: icarl)")
    _add_run_options(p, ("off", "pau"), "cim_demo", "folder for the runs and comparison.md")


def _run_demo(args) -> int:
    """Run the ablation runner on exps/<learner>_cim_demo.json with seed 1993 in the patched
    PyCIL checkout (PYCIL_ROOT, else the recorded one): 'off' trains the first phase, the plugin
    run starts from the same model and builds its own memory; then print and save a comparison:
    accuracy per phase, old/new classes, exemplars per class, box recall and area, bytes against
    the budget, wall time."""
    from pathlib import Path

    from cim_plugin import demo

    with _user_errors(demo.DemoError):
        demo.run_demo(args.learners, Path(args.out), echo=_echo if args.verbose else None, variants=args.variants,
                      shared_first_phase=not args.independent, jobs=args.jobs)
    return 0


def _add_ablate(sub) -> None:
    from cim_plugin.config import ABLATION_VARIANTS

    p = _subcommand(sub, "ablate", _run_ablate,
                    help="run plugin variants x seeds (x learners) at the same memory budget; resumable")
    p.add_argument("configs", nargs="+", metavar="CONFIG",
                   help="PyCIL JSON files, one per learner (a relative path is also looked up in the PyCIL checkout)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995], help="default: 1993 1994 1995")
    p.add_argument("--force", action="store_true", help="run again finished runs whose config changed")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    _add_run_options(p, ABLATION_VARIANTS, "cim_ablation", "output folder")
    p.add_argument("--first-phase-from", metavar="OUT", default=None,
                   help="start every run, off included, from the first phases another ablation's off runs trained "
                        "(OUT/runs/<learner>_off_s<seed>/first_phase.pt): a new setting of the later phases "
                        "(budget, codec, threshold) compared on the same first-phase models")
    p.add_argument("--checkpoints", action="store_true",
                   help="every run writes a checkpoint after each phase (cim_checkpoint, as if the JSON set it), "
                        "which benchmarks/quality_pilot.py --ablation and the diagnostics on a run's networks read")


def _run_ablate(args) -> int:
    """For each PyCIL JSON (one per learner), run PyCIL's main.py for every variant and seed:
    off = plain exemplars (PyCIL's own), full / uniform / random / cam / pau / oracle = the
    plugin's memory with that mask source (pau with the config's cim_bilevel), mrdc = whole images
    as JPEG, <mask>+<codec> (e.g. pau+jpeg) = a mask source with entropy-coded pixels. Only cim,
    cim_mask, cim_codec, seed and prefix change between runs, so all runs of a learner share the
    memory budget. Finished runs in OUT are skipped; crashed or
    killed ones run again. Writes OUT/aggregate.md, aggregate.csv, runs.csv and figures/*.png."""
    from cim_plugin import ablation

    with _user_errors(ablation.AblationError):
        outcome, _ = ablation.run_ablation(args.configs, args.variants, args.seeds, args.out, force=args.force,
                                           echo=_echo if args.verbose else None, figures=not args.no_figures,
                                           shared_first_phase=not args.independent, jobs=args.jobs,
                                           first_phase_from=args.first_phase_from, checkpoints=args.checkpoints)
    return 1 if outcome["failed"] else 0


def _add_report(sub) -> None:
    p = _subcommand(sub, "report", _run_report, help="write the tables and figures of an ablation folder again")
    p.add_argument("out", metavar="OUT", help="the ablation's output folder")
    p.add_argument("--no-figures", action="store_true", help="tables only")


def _run_report(args) -> int:
    """Read OUT/runs/*/results.json of finished runs and write aggregate.md, aggregate.csv,
    runs.csv and figures/*.png (mean ± std over seeds, one row per learner × variant)."""
    from cim_plugin import ablation, ablation_report

    with _user_errors(ablation.AblationError):
        written = ablation_report.report(args.out, figures=not args.no_figures)
    print(written["aggregate.md"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


# -------------------------------------------------------------------------------------- main

#: Each entry adds one subcommand to the parser (see the module docstring).
SUBCOMMANDS = [_add_patch, _add_where, _add_demo, _add_ablate, _add_report]


def build_parser() -> argparse.ArgumentParser:
    from cim_plugin import __version__

    parser = argparse.ArgumentParser(
        prog="cim-plugin",
        description="Class-incremental exemplar compression (CIM) as a plugin for PyCIL.",
    )
    parser.add_argument("--version", action="version", version=f"cim-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (already printed)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"cim-plugin {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
