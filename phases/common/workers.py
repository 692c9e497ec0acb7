"""Run one piece of work in a fresh worker process: its own interpreter (no GIL shared with the models
trained beside it), its own torch thread count, progress relayed back as it happens.

Why a process, not a thread: training three tiny-shape models in threads of one process on 2 cores
took 0.36 s a step each (0.29 s with one torch thread each; 0.185 s for one model alone on one core).
torch's thread count is per process, and at this size a step is largely Python, which threads share.

The worker is spawned (never forked: the parent runs Prefect's threads) and dies with the thread that
started it (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves no orphan writing into a work directory a
resumed run is about to use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import pickle
import queue
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

_PR_SET_PDEATHSIG = 1


class WorkerDied(RuntimeError):
    """The worker process ended without a result (killed, out of memory, crashed in native code)."""


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _worker_main(channel, fn: Callable[..., Any], args: tuple, kwargs: dict, threads: int, progress: bool) -> None:
    die_with_parent()
    torch.set_num_threads(threads)
    try:
        if progress:
            kwargs = kwargs | {"on_progress": lambda record: channel.put(("progress", record))}
        channel.put(("result", fn(*args, **kwargs)))
    except BaseException as exc:  # every failure goes back to the caller, whatever it is
        text = traceback.format_exc()
        try:  # the queue pickles in a background thread, where a failure would be lost: try it here
            pickle.dumps(exc)
        except Exception:  # the exception itself does not pickle: its text does
            exc = None
        channel.put(("error", (exc, text)))


def run_in_worker(fn: Callable[..., Any], *args: Any, threads: int = 1,
                  on_progress: Callable[[dict[str, Any]], None] | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a spawned process with ``threads`` torch threads; returns its result or
    raises its exception. With ``on_progress``, ``fn`` gets an ``on_progress`` whose records are passed to
    it here, in this thread. ``fn`` and its arguments must pickle (a module-level function, plain data)."""
    ctx = multiprocessing.get_context("spawn")
    channel = ctx.Queue()
    proc = ctx.Process(target=_worker_main, args=(channel, fn, args, kwargs, threads, on_progress is not None),
                       daemon=True, name=f"agent-forge:{getattr(fn, '__name__', 'worker')}")
    proc.start()
    try:
        while True:
            try:
                kind, payload = channel.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    raise WorkerDied(f"worker process for {fn.__name__} exited with code {proc.exitcode} "
                                     "and no result (killed, or out of memory?)") from None
                continue
            if kind == "progress":
                if on_progress is not None:
                    on_progress(payload)
            elif kind == "result":
                return payload
            else:
                exc, text = payload
                if exc is None:
                    raise RuntimeError(f"{fn.__name__} failed in its worker process:\n{text}")
                raise exc
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
