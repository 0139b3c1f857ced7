"""One OpenMP thread team per process: the one that runs the model's steps.

torch's CPU kernels run on OpenMP (libgomp), which keeps a team of worker threads for every
thread that has started a parallel region. Once the workers of all teams outnumber the CPUs,
libgomp stops letting idle workers spin: they sleep after every parallel region, and every
region of the next forward pays a wake-up. A decode step of the OCR engine runs hundreds of
regions; after one other thread had run a single parallel torch op (a processor resizing an
image, a model loading), a step measured 1.5× slower on a 2-core machine.

So the threads around the engine run their torch ops on themselves alone: the preprocessing
pool, which already prepares several requests side by side, and model loading, which runs once.
The engine's thread keeps every core. OpenMP's thread count is a per-thread setting, so this
touches no other thread; BLAS pools, which are process-wide, are left alone.

A program that embeds the server (``create_app``) and runs torch on threads of its own should
do the same for them (``threadpoolctl.threadpool_limits(1, user_api="openmp")``), or run that
work in another process.
"""

from __future__ import annotations

import threading
from typing import Any

_limited = threading.local()
_controller: Any = None
_lock = threading.Lock()


def single_openmp_thread() -> None:
    """From now on, the calling thread's OpenMP regions run on it alone. Idempotent; call it
    where the thread's torch work starts, once torch is imported (an OpenMP runtime that is not
    loaded yet cannot be set, and the next call tries again)."""
    if getattr(_limited, "done", False):
        return
    controller = _openmp()
    if controller is None:
        return
    controller.limit(limits=1, user_api="openmp")
    _limited.done = True


def _openmp() -> Any:
    """The loaded OpenMP runtimes (threadpoolctl's controller, built once they are loaded:
    finding them walks every loaded library), or None before any is."""
    global _controller
    with _lock:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            found = ThreadpoolController().select(user_api="openmp")
            if not found.lib_controllers:
                return None
            _controller = found
        return _controller
