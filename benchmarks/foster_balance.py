"""Benchmark (i), a diagnostic: FOSTER's class-balanced logits. The test accuracy (old / new classes)
of a later phase's network from a FOSTER checkpoint, with the raw logits (what PyCIL evaluates) and
with the logits divided by the per-class weights its last training stage used (beta2: the
compression stage trains on ``logits / weights``), and the share of new-class test images predicted
as an old class; and, free of the old/new bias, each group's accuracy among its own classes and
how often the group (old or new) is right; and each task's images among that task's own classes
(forgetting within a task, free of every between-task bias). Synthetic set only (the checkpoint's
run keys rebuild the set).

Run: ``PYCIL_ROOT=../PyCIL python benchmarks/foster_balance.py <log>_ckpt/task_1.pt`` (an ablation's
off run with a shared first phase writes its checkpoints under PyCIL's ``logs/``).
"""
import argparse
import os
import sys
from pathlib import Path

import first_phase_model as fpm
import numpy as np
import torch
from cim_plugin.data.synthetic import SyntheticSpec, load_synthetic
from cim_plugin.pycil import checkpoint as ckpt

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("checkpoint", help="a FOSTER task_<k>.pt, k >= 1")
p.add_argument("--pycil", default=os.environ.get("PYCIL_ROOT"), help="PyCIL checkout (default: PYCIL_ROOT)")
p.add_argument("--per-old", type=float, help="samples per old class the training loss's weights used (default: the "
               "budget, PyCIL's; a run with cim_foster_old_count 'stored' logs its count: 'class balance counts N')")
a = p.parse_args()
if not a.pycil:
    raise SystemExit("give --pycil or set PYCIL_ROOT: the checkpoint holds PyCIL's network classes")
sys.path.insert(0, a.pycil)
from utils.factory import get_model
payload = ckpt.read_checkpoint(Path(a.checkpoint), "cpu", True, f"cannot read checkpoint {a.checkpoint}")
run = payload["run"]; args = {**run, "device": [torch.device("cpu")]}
learner = get_model(args["model_name"], args)
net = ckpt.network_from_checkpoint(a.checkpoint, learner).eval()
if run.get("model_name", "").lower() != "foster" or run.get("dataset") != "synthetic":
    raise SystemExit(f"{a.checkpoint}: a FOSTER run on the synthetic set is needed, got {run.get('model_name')} on {run.get('dataset')}")
totals = [int(t) for t in payload["class_totals"]]
if len(totals) < 2:
    raise SystemExit(f"{a.checkpoint} is a first-phase checkpoint: there are no old classes yet")
known = totals[-2]; total = totals[-1]
order = {int(c): i for i, c in enumerate(payload["class_order"])}
print({k: run.get(k) for k in ("synthetic_colour","synthetic_image_size","synthetic_train_per_class","synthetic_test_per_class","memory_size","beta1","beta2")})
spec = SyntheticSpec(num_classes=run["synthetic_num_classes"], image_size=run["synthetic_image_size"], train_per_class=run["synthetic_train_per_class"], test_per_class=run["synthetic_test_per_class"], colour=run.get("synthetic_colour","class"))
data = load_synthetic(spec)
y = torch.tensor([order[int(v)] for v in data.test_y]); keep = (y < total)
x = data.test_x[keep.numpy()]; y = y[keep]
logits = fpm.outputs(net, x, "logits", batch=100)
if a.per_old is not None:
    per_old = a.per_old
elif run.get("fixed_memory"):
    if run.get("memory_per_class") is None:
        raise SystemExit(f"{a.checkpoint}: fixed_memory without memory_per_class in the checkpoint's run keys")
    per_old = int(run["memory_per_class"])  # PyCIL's samples_old_class
else:
    per_old = int(run["memory_size"]) // known
def weights(beta, n_new):
    counts = [per_old]*known + [n_new]*(total-known)
    eff = 1.0 - np.power(beta, counts); w = (1.0 - beta)/eff; return torch.tensor(w/np.sum(w)*len(counts), dtype=torch.float32)
old = y < known
def acc(l):
    pred = l.argmax(1)
    return f"all {100*(pred==y).float().mean():.1f}, old {100*(pred[old]==y[old]).float().mean():.1f}, new {100*(pred[~old]==y[~old]).float().mean():.1f}, predicted old for {100*(pred[~old] < known).float().mean():.1f}% of new-class images"
def among(l, lo, hi):
    """Share (%) of the images of classes lo..hi-1 classified right among those classes only."""
    sel = (y >= lo) & (y < hi)
    return 100 * float((l[sel][:, lo:hi].argmax(1) + lo == y[sel]).float().mean())
def within(l):
    """What the memory's content can change apart from the old/new balance: each group's images
    classified among their own group's classes only, and how often the group itself is right."""
    group = ((l.argmax(1) < known) == old).float().mean()
    return (f"old images among old classes {among(l, 0, known):.1f}, new among new {among(l, known, total):.1f}; "
            f"group (old vs new) right for {100*group:.1f}% of images")
def per_task(l):
    """Forgetting free of every between-task bias: each task's test images classified among that
    task's own classes only (task 0's figure compares with the first phase's test accuracy)."""
    bounds = [0] + totals
    return ", ".join(f"task {t} {among(l, bounds[t], bounds[t + 1]):.1f}" for t in range(len(totals)))
w2 = weights(run["beta2"], run["synthetic_train_per_class"])
print("per-class weights (beta2):", [round(float(v),3) for v in w2[[0, -1]]], "old / new")
print("raw logits (PyCIL's evaluation):", acc(logits))
print("logits / weights (the training loss's view):", acc(logits / w2))
print("within each group (bias-free):", within(logits))
print("each task among its own classes:", per_task(logits))
