"""Per-run results file and per-phase memory figures, for every run (plugin on or off).

``ResultsMixin`` is composed in front of any PyCIL learner. It records what ``eval_task``
returns and, after every phase, the memory: exemplars per class, units used, bytes used and the
budget in bytes; it logs these figures and rewrites ``<PyCIL log name>_results.partial.json``
atomically, so a crashed run keeps the phases it finished there. Only a finished run writes
``<PyCIL log name>_results.json`` (atomically, then the partial file is removed) and prints its path
at the end: a run that fails before finishing (a refused checkpoint, a crash, a kill) never
replaces the results of an earlier finished run of the same name. Under torchrun only rank 0 writes.

Per phase: CNN and NME top-1 (and PyCIL's grouped figures), the per-task accuracies (a row of the
accuracy matrix, computed from the same predictions PyCIL scores), the memory figures, the elapsed
time and, with the plugin on, the seconds spent in CIM's own work (mask steps, box refreshes,
memory building) and, with a feature memory, ``feature_memory`` (the stored vectors' drift before and
after adaptation, the adaptation MLP's figures, the rehearsal steps) or ``pca_memory`` (reconstruction
cosine, decode time, rehearsal steps; both from ``cim_phase_figures``). The summary holds average incremental and last accuracy, forgetting (PyCIL's
definition, see ``cim_plugin.metrics``), the final memory and the wall time; ``config`` holds every
key of the run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..atomic import atomic_open
from ..metrics import forgetting, per_task_accuracy

log = logging.getLogger(__name__)


def run_base(args: dict) -> str:
    """PyCIL's log name of the run without ``.log`` (set by the patched trainer), or a fallback."""
    return args.get("logfilename") or os.path.join("logs", f"{args.get('model_name', 'run')}_{args.get('seed', 0)}")


def results_path(args: dict) -> Path:
    """The results file of a finished run."""
    return Path(f"{run_base(args)}_results.json")


def partial_results_path(args: dict) -> Path:
    """The results file of a run in progress (or of one that stopped before finishing)."""
    return Path(f"{run_base(args)}_results.partial.json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_open(path, "w") as f:
        json.dump(payload, f, indent=2)


def plain_memory_figures(learner: Any, storage_size: int) -> dict:
    """Memory figures of PyCIL's own (uncompressed) exemplar memory."""
    targets = np.asarray(learner._targets_memory)
    data = learner._data_memory
    labels, counts = np.unique(targets, return_counts=True) if len(targets) else ([], [])
    holds_pixels = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4
    if holds_pixels:
        full = int(np.prod(data.shape[1:]))
    else:  # file paths: count each exemplar at the plugin's storage resolution
        full = storage_size * storage_size * 3
    per_class = learner.samples_per_class
    n_classes = learner._total_classes
    return {
        "kind": "plain",
        "exemplars": int(len(targets)),
        "exemplars_per_class": {str(int(k)): int(v) for k, v in zip(labels, counts)},
        "mean_exemplars_per_class": float(np.mean(counts)) if len(targets) else 0.0,
        "units_used": float(len(targets)),
        "bytes_used": int(len(targets) * full),
        "bytes_counted_at_storage_resolution": not holds_pixels,
        "full_exemplar_bytes": full,
        "units_per_class": per_class,
        "budget_units": per_class * n_classes,
        "budget_bytes": int(per_class * n_classes * full),
    }


def format_memory(m: dict) -> str:
    per = list(m["exemplars_per_class"].values()) or [0]
    return (
        f"{m['kind']} memory: {m['exemplars']} exemplars, {m['mean_exemplars_per_class']:.2f}/class "
        f"(min {min(per)}, max {max(per)}), {m['units_used']:.2f}/{m['budget_units']} units, "
        f"{m['bytes_used']:,}/{m['budget_bytes']:,} bytes"
    )


def old_new_accuracy(y_pred: np.ndarray, y_true: np.ndarray, known: int) -> dict:
    """Top-1 (%) on the classes learnt before this phase (``old``, labels < ``known``) and on this
    phase's classes (``new``); None where a group has no test sample."""
    top1 = np.asarray(y_pred)[:, 0] if np.ndim(y_pred) == 2 else np.asarray(y_pred)
    y_true = np.asarray(y_true)
    out = {}
    for name, sel in (("old", y_true < known), ("new", y_true >= known)):
        out[name] = round(float((top1[sel] == y_true[sel]).mean() * 100), 2) if sel.any() else None
    return out


def format_diagnostics(d: dict) -> str:
    st = d["stored"]
    text = (f"box diagnostics: stored exemplars recall {st['mean_box_recall']:.3f} at area {st['mean_box_area']:.3f}, "
            f"PSNR {'inf' if st['psnr_db'] is None else format(st['psnr_db'], '.1f')} dB")
    if "augmentation" in d:
        a = d["augmentation"]
        text += f"; augmentation boxes recall {a['mean_box_recall']:.3f} at area {a['mean_box_area']:.3f}"
    if "tau_curve" in d:
        text += "; tau curve (tau: area/recall) " + ", ".join(
            f"{r['tau']:.1f}: {r['mean_box_area']:.2f}/{r['mean_recall']:.2f}" for r in d["tau_curve"])
    return text


class ResultsMixin:
    """Records accuracies and memory figures per phase into a results.json beside PyCIL's log."""

    def _results_setup(self, args: dict, storage_size: int) -> None:
        self._results_file = results_path(args)
        self._results_partial_file = partial_results_path(args)
        self._results_storage_size = storage_size
        self._results_t0 = time.time()
        self._results_pending: dict = {}
        self._results_evals: list = []
        self._results = {
            "results_version": 2,
            "model_name": args.get("model_name"),
            "dataset": args.get("dataset"),
            "seed": args.get("seed"),
            "cim": bool(args.get("cim", False)),
            "cim_mask": args.get("cim_mask", "cam") if args.get("cim") else None,
            "cim_memory": args.get("cim_memory", "image") if args.get("cim") else None,
            "log_file": f"{args['logfilename']}.log" if args.get("logfilename") else None,
            "phases": [],
            "config": _jsonable({k: v for k, v in args.items()}),
        }

    def _evaluate(self, y_pred, y_true):
        """PyCIL's scoring, plus the per-task accuracies of the same predictions."""
        out = super()._evaluate(y_pred, y_true)
        args = self.args
        n_tasks = self._cur_task + 1
        self._results_evals.append({
            "tasks": per_task_accuracy(y_pred, y_true, int(args["init_cls"]), int(args["increment"]), n_tasks),
            **old_new_accuracy(y_pred, y_true, self._known_classes),
        })
        return out

    def eval_task(self, *args, **kwargs):
        self._results_evals = []
        cnn, nme = super().eval_task(*args, **kwargs)
        evals = self._results_evals  # [cnn] or [cnn, nme], in eval_task's order
        self._results_pending = {
            "task": self._cur_task,
            "classes": self._total_classes,
            "cnn_top1": float(cnn["top1"]),
            "cnn_top5": float(cnn.get("top5", float("nan"))),
            "cnn_grouped": _jsonable(cnn["grouped"]),
            "nme_top1": None if nme is None else float(nme["top1"]),
            "nme_grouped": None if nme is None else _jsonable(nme["grouped"]),
            "cnn_task_accuracy": evals[0]["tasks"] if evals else None,
            "nme_task_accuracy": evals[1]["tasks"] if nme is not None and len(evals) > 1 else None,
            "cnn_old_top1": evals[0]["old"] if evals else None,
            "cnn_new_top1": evals[0]["new"] if evals else None,
            "nme_old_top1": evals[1]["old"] if nme is not None and len(evals) > 1 else None,
            "nme_new_top1": evals[1]["new"] if nme is not None and len(evals) > 1 else None,
        }
        return cnn, nme

    def _results_memory(self) -> dict:
        parts = getattr(self, "cim", None)
        memory = None if parts is None else parts.memory
        if memory is not None:
            return memory.summary(self.samples_per_class, self._total_classes)
        return plain_memory_figures(self, self._results_storage_size)

    def after_task(self):
        out = super().after_task()
        phase = {**self._results_pending, "memory": self._results_memory(), "elapsed_s": round(time.time() - self._results_t0, 2)}
        diagnostics = getattr(self, "cim_diagnostics", None)
        if callable(diagnostics) and (diag := diagnostics()) is not None:
            phase["diagnostics"] = diag
            log.info("Task %s %s", phase.get("task"), format_diagnostics(diag))
        figures = getattr(self, "cim_phase_figures", None)
        if callable(figures):  # the memory kind's own figures (the feature memory's drift, ...)
            phase.update(figures())
        parts = getattr(self, "cim", None)
        if parts is not None:  # CIM's own work in this phase (plugin on)
            seconds = parts.seconds
            phase["cim_seconds"] = {k: round(v, 2) for k, v in seconds.items()}
            seconds.clear()
        self._results_pending = {}
        self._results["phases"].append(phase)
        log.info("Task %s %s", phase.get("task"), format_memory(phase["memory"]))
        self._results_write()
        return out

    def _results_write(self) -> None:
        phases = self._results["phases"]
        cnn = [p["cnn_top1"] for p in phases if "cnn_top1" in p]
        nme = [p["nme_top1"] for p in phases if p.get("nme_top1") is not None]
        matrices = {
            kind: [p[f"{kind}_task_accuracy"] for p in phases if p.get(f"{kind}_task_accuracy") is not None]
            for kind in ("cnn", "nme")
        }
        cim_seconds: dict = {}
        for p in phases:
            for k, v in p.get("cim_seconds", {}).items():
                cim_seconds[k] = round(cim_seconds.get(k, 0.0) + v, 2)
        self._results["accuracy_matrix"] = {k: v for k, v in matrices.items() if v}
        later = phases[1:]
        stored = (phases[-1].get("diagnostics") or {}).get("stored", {}) if phases else {}

        def later_mean(key: str) -> float | None:
            values = [p[key] for p in later if p.get(key) is not None]
            return float(np.mean(values)) if values else None

        self._results["summary"] = {
            "phases": len(phases),
            "avg_incremental_cnn_top1": float(np.mean(cnn)) if cnn else None,
            "last_cnn_top1": cnn[-1] if cnn else None,
            "avg_incremental_nme_top1": float(np.mean(nme)) if nme else None,
            "last_nme_top1": nme[-1] if nme else None,
            "forgetting_cnn": forgetting(matrices["cnn"]),
            "forgetting_nme": forgetting(matrices["nme"]) if len(matrices["nme"]) == len(phases) else None,
            "exemplars_per_class": phases[-1]["memory"]["exemplars_per_class"] if phases else None,
            "units_used": phases[-1]["memory"]["units_used"] if phases else None,
            "budget_units": phases[-1]["memory"].get("budget_units") if phases else None,
            "mean_exemplars_per_class": phases[-1]["memory"]["mean_exemplars_per_class"] if phases else None,
            "bytes_used": phases[-1]["memory"]["bytes_used"] if phases else None,
            "budget_bytes": phases[-1]["memory"]["budget_bytes"] if phases else None,
            "wall_time_s": round(time.time() - self._results_t0, 2),
            "cim_seconds": cim_seconds or None,
            # the gain split: phase 0 (before any exemplar is replayed) and the phases after it
            "first_phase_cnn_top1": cnn[0] if cnn else None,
            "later_phases_avg_cnn_top1": later_mean("cnn_top1"),
            "later_phases_old_cnn_top1": later_mean("cnn_old_top1"),
            "later_phases_new_cnn_top1": later_mean("cnn_new_top1"),
            "first_phase_from": self.args.get("cim_first_phase_from") if hasattr(self, "args") else None,
            "stored_box_recall": stored.get("mean_box_recall"),
            "stored_box_area": stored.get("mean_box_area"),
            "stored_psnr_db": stored.get("psnr_db"),
        }
        if not distributed.is_main():  # under torchrun only rank 0 writes
            return
        if self._results.get("finished") is True:
            write_json_atomic(self._results_file, self._results)
            self._results_partial_file.unlink(missing_ok=True)
        else:  # a finished file of an earlier run stays as it is until this run finishes
            write_json_atomic(self._results_partial_file, self._results)

    def _results_finish(self) -> Path:
        self._results["finished"] = True
        self._results_write()
        if distributed.is_main():
            log.info("cim-plugin results: %s", self._results_file)
            print(f"Results written to {self._results_file}", flush=True)
        return self._results_file
