"""Run tasks side by side: up to ``width`` at once, a task starting only once the gate it waits for is open.

The ablation runner's scheduler (``cim-plugin ablate --jobs N``). A task's gate is another task's
name: that task opens it while it runs (the ``off`` run, as soon as its phase-0 checkpoint is on
disk) or when it ends; a task that ends without opening its gate closes it, and whatever waited
for it fails with :class:`GateClosed` without being started. Tasks start in the given order among
those whose gate is open, so with ``width`` 1 this is the plain sequential loop.

Threads only wait here (each task runs a subprocess); stopping the caller (Ctrl-C, SIGTERM) calls
``stop`` so the subprocesses end, then waits for the threads. No torch import.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

#: Seconds between looks at the gates while every free slot's candidates wait (runs take minutes).
POLL_S = 0.2


class GateClosed(RuntimeError):
    """The task a task waited for ended without opening its gate."""


@dataclass(frozen=True)
class Task:
    name: str
    #: called in a worker thread with ``open_gate()``; its return value goes to ``on_end``
    run: Callable[[Callable[[], None]], Any]
    #: the name of the task whose gate this one waits for, or None
    waits_for: str | None = None


class _Gates:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, bool] = {}

    def open(self, name: str) -> None:
        with self._lock:
            self._state[name] = True

    def close_unless_open(self, name: str) -> None:
        with self._lock:
            self._state.setdefault(name, False)

    def state(self, name: str | None) -> bool | None:
        """True open, False closed, None not decided yet (no gate counts as open)."""
        if name is None:
            return True
        with self._lock:
            return self._state.get(name)


def run_side_by_side(tasks: Sequence[Task], width: int, on_start: Callable[[Task], None],
                     on_end: Callable[[Task, Any, BaseException | None], None],
                     stop: Callable[[], None] = lambda: None) -> None:
    """Run every task once; ``on_start(task)`` before it runs, ``on_end(task, result, error)`` after
    (error: the exception it raised, or GateClosed when it never ran), both in this thread."""
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    names = {t.name for t in tasks}
    missing = sorted({t.waits_for for t in tasks if t.waits_for is not None and t.waits_for not in names})
    if missing:
        raise ValueError(f"tasks wait for gates no task opens: {', '.join(missing)}")
    waits = {t.name: t.waits_for for t in tasks}
    for task in tasks:
        seen, name = set(), task.name
        while name is not None:
            if name in seen:
                raise ValueError(f"tasks wait for each other in a circle: {' -> '.join(sorted(seen))}")
            seen.add(name)
            name = waits[name]
    gates, pending = _Gates(), list(tasks)
    running: dict[Future, Task] = {}
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="side-by-side") as pool:
        try:
            while pending or running:
                for task in list(pending):
                    if len(running) >= width:
                        break
                    gate = gates.state(task.waits_for)
                    if gate is None:
                        continue
                    pending.remove(task)
                    if gate is False:
                        on_end(task, None, GateClosed(f"{task.waits_for} ended without opening the gate {task.name} waited for"))
                        continue
                    on_start(task)
                    running[pool.submit(task.run, lambda name=task.name: gates.open(name))] = task
                if not running:
                    continue  # a gate just closed: its waiters fail in the next pass
                done, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    gates.close_unless_open(task.name)
                    error = future.exception()
                    on_end(task, None if error else future.result(), error)
        except BaseException:
            stop()
            for future in running:
                future.cancel()
            raise
