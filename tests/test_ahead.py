"""export/quantize/ahead.py: weights computed ahead of the writer, in bounded memory."""

import threading
import time

import numpy as np
import pytest

from export.quantize.ahead import Ahead


def test_results_equal_computing_in_turn_and_budget_holds():
    names = [f"w{i}" for i in range(12)]
    held, peak, lock = [0], [0], threading.Lock()

    def compute(name):
        value = np.full(1000, int(name[1:]), np.float64)  # 8000 bytes
        with lock:
            held[0] += value.nbytes
            peak[0] = max(peak[0], held[0])
        return value

    with Ahead(names, compute, budget=20_000, workers=2) as ahead:
        time.sleep(0.2)  # let the threads run into the budget
        out = []
        for name in names:
            v = ahead.take(name)
            with lock:
                held[0] -= v.nbytes
            out.append(v)
    assert [int(v[0]) for v in out] == list(range(12))
    # at most the budget's worth waiting, plus one result per thread and one the writer
    # computes itself (a name no thread had started) finishing past it; no budget: 12 x 8000
    assert peak[0] <= 20_000 + 3 * 8000


def test_out_of_order_and_unknown_names_are_computed_by_the_caller():
    calls = []

    def compute(name):
        calls.append(name)
        return np.zeros(10)

    with Ahead(["a", "b", "c"], compute, budget=0, workers=1) as ahead:
        ahead.take("c")  # the thread is held by the budget: computed here, and the thread skips it
        ahead.take("z")
        ahead.take("a")
        ahead.take("b")
    assert sorted(calls) == ["a", "b", "c", "z"] and calls.count("c") == 1


def test_an_error_reaches_the_writer_and_close_stops_the_threads():
    def compute(name):
        if name == "bad":
            raise ValueError("broken weight bad")
        return np.zeros(4)

    ahead = Ahead(["ok", "bad", "later"], compute, workers=1)
    assert ahead.take("ok").shape == (4,)
    with pytest.raises(ValueError, match="broken weight bad"):
        ahead.take("bad")
    ahead.close()
    assert not any(t.is_alive() for t in ahead._threads)


def test_costs_keep_big_weights_from_running_side_by_side():
    """With costs, a thread starts a weight only when the held results and the running costs
    leave room for it; a weight over the whole budget runs alone."""
    running, peak, lock = [0], [0], threading.Lock()
    costs = {"big1": 100, "s1": 10, "big2": 100, "s2": 10, "s3": 10}

    def compute(name):
        with lock:
            running[0] += costs[name]
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= costs[name]
        return None  # holds nothing

    with Ahead(list(costs), compute, budget=60, workers=2, cost=costs.get) as ahead:
        for name in costs:
            ahead.take(name)
    assert peak[0] <= 100  # never big1 beside another weight
