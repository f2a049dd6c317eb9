"""The side-by-side scheduler of the ablation runner: width, gates, order, stopping."""

import threading
import time

import pytest

from cim_plugin.side_by_side import GateClosed, Task, run_side_by_side


def record(tasks, width, stop=lambda: None):
    events, results = [], {}
    run_side_by_side(tasks, width, lambda t: events.append(("start", t.name)),
                     lambda t, r, e: (events.append(("end", t.name)), results.__setitem__(t.name, (r, e))), stop)
    return events, results


def test_width_one_runs_in_the_given_order_one_at_a_time():
    tasks = [Task(n, lambda opened, n=n: n.upper()) for n in "abc"]
    events, results = record(tasks, 1)
    assert events == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b"), ("start", "c"), ("end", "c")]
    assert results == {n: (n.upper(), None) for n in "abc"}


def test_at_most_width_tasks_run_at_once():
    lock, now, peak = threading.Lock(), [0], [0]

    def work(opened):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1

    record([Task(str(i), work) for i in range(6)], 2)
    assert peak[0] == 2


def test_a_task_starts_when_its_gate_opens_not_when_the_opener_ends():
    later = threading.Event()

    def opener(opened):
        opened()
        return later.wait(5)  # True only if the waiter ran meanwhile

    events, results = record([Task("off", opener), Task("cam", lambda opened: later.set(), waits_for="off")], 2)
    assert results["off"] == (True, None) and events.index(("start", "cam")) < events.index(("end", "off"))


def test_a_gate_closes_when_its_task_ends_without_opening_it():
    def crash(opened):
        raise RuntimeError("boom")

    events, results = record([Task("off", crash), Task("cam", lambda opened: 1, waits_for="off"),
                              Task("other", lambda opened: 2)], 2)
    assert isinstance(results["off"][1], RuntimeError) and results["other"] == (2, None)
    assert isinstance(results["cam"][1], GateClosed) and "off ended without opening" in str(results["cam"][1])
    assert ("start", "cam") not in events


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="width must be at least 1"):
        record([Task("a", lambda o: 1)], 0)
    with pytest.raises(ValueError, match="gates no task opens: ghost"):
        record([Task("a", lambda o: 1, waits_for="ghost")], 1)
    with pytest.raises(ValueError, match="in a circle"):
        record([Task("a", lambda o: 1, waits_for="b"), Task("b", lambda o: 1, waits_for="a")], 2)


def test_an_error_of_the_caller_stops_the_running_tasks_and_propagates():
    stopped, release = [], threading.Event()

    def long(opened):
        release.wait(5)

    def on_end(task, result, error):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_side_by_side([Task("quick", lambda o: None), Task("long", long)], 2, lambda t: None, on_end,
                         lambda: (stopped.append(True), release.set()))
    assert stopped == [True]
