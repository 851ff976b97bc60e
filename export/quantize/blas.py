"""One BLAS thread for the quantizer's matrix products.

The int4 and dynamic-int8 recipes rotate weights with matrix products (export/quantize/rotate.py)
before their codes are chosen. Two reasons to run those products on one BLAS thread:

- the same bytes from every path: multithreaded OpenBLAS splits a product's rows between its
  threads differently from one call to the next size or thread count, and rounds some outputs
  differently (605 bytes of a 540 MiB gemma3-1b int4 file moved between an export run in the
  look-ahead threads and one run in the main thread); one thread rounds the same everywhere on a
  given CPU;
- speed where the quantizer already runs in parallel (export/quantize/ahead.py's threads):
  OpenBLAS's threads spin for a while after each product waiting for the next, beside the
  threads doing the work (~13 CPU-s of gemma3-1b's TFLite int4 export's 50; docs/memory.md).
  A one-thread product wakes none of them.

`single_thread()` is re-entrant across threads: the limit (threadpoolctl, process-wide) is set by
the first holder and restored by the last, so one thread leaving cannot lift it under another.
Without threadpoolctl it does nothing.

Which thread may set it: threadpoolctl 3.8 lets only one thread change OpenBLAS's (process-wide)
thread count, the first that did while it lives, and silently ignores the others. An export's
look-ahead threads then ran their rotations on OpenBLAS's two threads whenever the main thread
had rotated something first: gemma3-1b int4 exports of one checkpoint differed in a few dozen
bytes from run to run (a scale's last bit, depending on which thread quantized which weight).
The holders here are coordinated by their own lock and count, so the thread that sets or
restores the limit takes control first (`clear_controlling_thread(force=True)`, where the
library's controller has it).
"""

from __future__ import annotations

import contextlib
import threading

_LOCK = threading.Lock()
_DEPTH = 0  # holders of single_thread() now
_LIMITS = None  # what restores the BLAS limits when the last holder leaves
_CONTROLLER = None  # threadpoolctl's view of the loaded BLAS libraries, made once


def _limit():
    """Set BLAS to one thread; the limiter that restores it (None without threadpoolctl). The
    controller (the loaded BLAS libraries, found by scanning the process) is made once."""
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return None
        _CONTROLLER = ThreadpoolController()
    _take_control()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def _take_control():
    """Let this thread change the BLAS libraries' thread counts (see the module docstring)."""
    for lib in _CONTROLLER.lib_controllers:
        clear = getattr(type(lib), "clear_controlling_thread", None)
        if clear is not None:
            clear(force=True)


@contextlib.contextmanager
def single_thread():
    global _DEPTH, _LIMITS
    with _LOCK:
        if _DEPTH == 0:
            _LIMITS = _limit()
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0 and _LIMITS is not None:
                _take_control()
                _LIMITS.restore_original_limits()
                _LIMITS = None
