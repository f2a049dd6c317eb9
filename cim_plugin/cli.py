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
  2. here, write ``_add_demo(sub)`` that declares its arguments and ``set_defaults(func=_run_demo)``,
     and ``_run_demo(args) -> int`` that imports the module *inside* the function (so that
     ``cim-plugin where`` never pays for importing torch) and calls it;
  3. append ``_add_demo`` to ``SUBCOMMANDS``.
``main`` prints a ``UserError`` as ``cim-plugin <command>: error: <message>`` on stderr and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    """A problem the user can fix; ``main`` prints the message and exits with status 2."""


def _echo(line: str) -> None:
    """Print a line of a PyCIL run as it comes (``--verbose``)."""
    print(line, end="", flush=True)


# ------------------------------------------------------------------------------------- patch


def _add_patch(sub) -> None:
    p = sub.add_parser(
        "patch",
        help="patch a PyCIL checkout for cim-plugin (safe to run again)",
        description=(
            "Apply cim-plugin's patches/ to a git checkout of PyCIL at the pinned commit, link the "
            "plugin's exps/*.json into its exps/ folder and record where it is. Checks everything "
            "first and changes nothing if a check fails; running it again changes nothing."
        ),
    )
    p.add_argument("pycil_dir", metavar="PYCIL_DIR", help="the top folder of your PyCIL git clone")
    p.set_defaults(func=_run_patch)


def _run_patch(args) -> int:
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
    p = sub.add_parser(
        "where",
        help="show the PyCIL checkout cim-plugin uses and whether it is patched",
        description=(
            "Show the PyCIL checkout cim-plugin finds (PYCIL_ROOT, else the one recorded by "
            "`cim-plugin patch`), its commit and whether it is patched. Exits with status 1 if "
            "none is found."
        ),
    )
    p.set_defaults(func=_run_where)


def _run_where(args) -> int:
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


# -------------------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    from cim_plugin.config import ABLATION_VARIANTS

    p = sub.add_parser(
        "demo",
        help="plugin off vs on on the built-in synthetic set, printing the comparison",
        description=(
            "Run the ablation runner on exps/<learner>_cim_demo.json with seed 1993 in the patched PyCIL "
            "checkout (PYCIL_ROOT, else the recorded one): 'off' trains the first phase, the plugin run starts "
            "from the same model and builds its own memory; then print and save a comparison: accuracy per "
            "phase, old/new classes, exemplars per class, box recall and area, bytes against the budget, wall time."
        ),
    )
    p.add_argument("--learners", nargs="+", default=["icarl"], choices=["icarl", "der", "foster", "lucir"],
                   help="learners to compare (default: icarl)")
    p.add_argument("--variants", nargs="+", default=["off", "pau"], choices=list(ABLATION_VARIANTS),
                   help="runs per learner (default: off pau); e.g. off cam pau oracle")
    p.add_argument("--independent", action="store_true", help="every run trains its own first phase")
    p.add_argument("--out", default="cim_demo", help="folder for the runs and comparison.md (default: ./cim_demo)")
    p.add_argument("--verbose", action="store_true", help="echo PyCIL's output while it runs")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from pathlib import Path

    from cim_plugin import demo

    echo = _echo if args.verbose else None
    try:
        demo.run_demo(args.learners, Path(args.out), echo=echo, variants=args.variants,
                      shared_first_phase=not args.independent)
    except demo.DemoError as err:
        raise UserError(str(err)) from None
    return 0


# ------------------------------------------------------------------------------------ ablate


def _add_ablate(sub) -> None:
    from cim_plugin.ablation import VARIANTS

    p = sub.add_parser(
        "ablate",
        help="run plugin variants x seeds (x learners) at the same memory budget; resumable",
        description=(
            "For each PyCIL JSON (one per learner), run PyCIL's main.py for every variant and seed: "
            "off = plain exemplars, uniform / random / cam / pau = CIM with that mask source (pau with "
            "the config's cim_bilevel). Only cim, cim_mask, seed and prefix change between runs, so all "
            "runs of a learner share the memory budget. Finished runs in OUT are skipped; crashed or "
            "killed ones run again. Writes OUT/aggregate.md, aggregate.csv, runs.csv and figures/*.png."
        ),
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG",
                   help="PyCIL JSON files, one per learner (a relative path is also looked up in the PyCIL checkout)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="default: all of " + " ".join(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995], help="default: 1993 1994 1995")
    p.add_argument("--out", default="cim_ablation", help="output folder (default: ./cim_ablation)")
    p.add_argument("--force", action="store_true", help="run again finished runs whose config changed")
    p.add_argument("--independent", action="store_true",
                   help="train every variant's first phase itself (default: the 'off' run of each learner and seed "
                        "trains phase 0 once and every variant starts from that model, building its own memory)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--verbose", action="store_true", help="echo PyCIL's output while it runs")
    p.set_defaults(func=_run_ablate)


def _run_ablate(args) -> int:
    from cim_plugin import ablation

    echo = _echo if args.verbose else None
    try:
        outcome, _ = ablation.run_ablation(args.configs, args.variants, args.seeds, args.out, force=args.force,
                                           echo=echo, figures=not args.no_figures,
                                           shared_first_phase=not args.independent)
    except ablation.AblationError as err:
        raise UserError(str(err)) from None
    return 1 if outcome["failed"] else 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write the tables and figures of an ablation folder again",
        description="Read OUT/runs/*/results.json of finished runs and write aggregate.md, aggregate.csv, "
                    "runs.csv and figures/*.png (mean ± std over seeds, one row per learner × variant).",
    )
    p.add_argument("out", metavar="OUT", help="the ablation's output folder")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from cim_plugin import ablation

    try:
        written = ablation.report(args.out, figures=not args.no_figures)
    except ablation.AblationError as err:
        raise UserError(str(err)) from None
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
