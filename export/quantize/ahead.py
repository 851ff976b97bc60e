"""Quantize the next weights while the current one is packed and written.

A streamed export quantizes one weight at a time and writes it (export/quantize/blocks.py:
PendingBlocks). The block search runs on every core, but the rest of a weight's turn (reading
the checkpoint, packing codes into the target's layout, writing the file) runs on one. `Ahead`
computes the weights' encoded forms in two background threads, in the order the writer takes
them, so those single-core stretches overlap the next weight's search. Memory is bounded: a
thread starts a weight only while the results waiting plus the working memory of the weights in
progress stay within a budget (512 MiB by default).

The writer calls `take(name)`: the result if a thread has it (or waits for the one in
progress), else computes it itself (a name no thread has reached); it waits only for weights in
progress to make room, never for the budget to drain (which only it can do), so nothing
deadlocks, and the results are the same as computing each weight in turn (the same function per
name; the artifacts are byte-identical, tests/test_streamed.py). An error in a thread is raised by
`take` for that weight. `close()` (or leaving the `with`) stops the threads after their current
weight and drops what was not taken.

The threads' matrix products (the input rotations) run on one BLAS thread each
(export/quantize/blas.py): OpenBLAS's own threads, spinning after each product beside the
quantizing threads, cost gemma3-1b's TFLite int4 export ~13 CPU-s of its ~50. The threads are
the parallelism here; BLAS threads only competed with them.

gemma3-1b int4-b32 from a bf16 checkpoint, 2 cores: docs/memory.md "Export time".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

BUDGET = 512 << 20


def nbytes(value) -> int:
    """Bytes of the arrays in `value` (an array, a tuple / list of them, or an object with
    array attributes), for the budget."""
    if value is None:
        return 0
    if hasattr(value, "nbytes") and not callable(value.nbytes):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values() if hasattr(v, "nbytes") or isinstance(v, (tuple, list)))
    return 0


class Ahead:
    """`compute(name)` for each name of `order`, in `workers` background threads (each takes the
    next name not yet started: with two, one weight's single-core stretches overlap the next
    one's search). A thread starts a weight only while the results held plus the `cost(name)`
    (its working memory, e.g. its codes at a byte per parameter) of those being computed stay
    within `budget`, or when nothing is held or running (one weight larger than the budget, a
    12B model's 1 GB of table codes, runs alone)."""

    def __init__(self, order: Iterable[str], compute: Callable[[str], Any], budget: int = BUDGET,
                 workers: int = 2, cost: Callable[[str], int] | None = None):
        self._order = list(dict.fromkeys(order))
        self._next = 0
        self._compute = compute
        self._budget = budget
        self._cond = threading.Condition()
        self._done: dict[str, tuple[Any, BaseException | None]] = {}
        self._claimed: set[str] = set()  # names the writer computes itself
        self._busy: set[str] = set()
        self._held = 0
        self._cost = cost or (lambda name: 0)
        self._running = 0  # the costs of the weights being computed
        self._waiting = 0  # writers waiting to compute a weight themselves
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"quantize-ahead-{i}", daemon=True)
                         for i in range(workers if self._order else 0)]
        for t in self._threads:
            t.start()

    def _run(self):
        while True:
            with self._cond:
                while True:
                    while self._next < len(self._order) and self._order[self._next] in self._claimed:
                        self._next += 1
                    if self._stop or self._next >= len(self._order):
                        return
                    cost = self._cost(self._order[self._next])
                    used = self._held + self._running
                    if not self._waiting and (used == 0 or used + cost <= self._budget):  # alone, any size goes
                        break
                    self._cond.wait()
                name = self._order[self._next]
                self._next += 1
                self._busy.add(name)
                self._running += cost
            try:
                value, error = self._compute(name), None
            except BaseException as e:  # handed to the writer, which raises it
                value, error = None, e
            with self._cond:
                self._busy.discard(name)
                self._running -= cost
                if not self._stop:
                    self._done[name] = (value, error)
                    self._held += nbytes(value)
                self._cond.notify_all()
                if error is not None:
                    self._stop = True
                    return

    def take(self, name: str):
        """compute(name)'s result: from the thread, or computed here."""
        with self._cond:
            while name in self._busy:
                self._cond.wait()
            if name in self._done:
                value, error = self._done.pop(name)
                self._held -= nbytes(value)
                self._cond.notify_all()
                if error is not None:
                    raise error
                return value
            self._claimed.add(name)
            cost = self._cost(name) if name in self._order else 0
            # wait for the running weights to make room (they finish on their own: no deadlock);
            # the threads start nothing new meanwhile
            self._waiting += 1
            while self._running > 0 and self._held + self._running + cost > self._budget:
                self._cond.wait()
            self._waiting -= 1
            self._running += cost
        try:
            return self._compute(name)
        finally:
            with self._cond:
                self._running -= cost
                self._cond.notify_all()

    def close(self):
        with self._cond:
            self._stop = True
            self._done.clear()
            self._held = 0
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
