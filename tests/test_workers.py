"""run_in_worker: a spawned process with its own torch threads; results, progress and failures come back."""

import os

import pytest
import torch

from phases.cognate.trainer import GateCollapse
from phases.common.workers import WorkerDied, run_in_worker


def _threads_and_pid(scale: float, on_progress=None) -> dict:
    for step in range(3):
        on_progress({"step": step, "value": step * scale})
    return {"threads": torch.get_num_threads(), "pid": os.getpid(), "sum": float(torch.arange(4.0).sum() * scale)}


def _collapses() -> None:
    raise GateCollapse("MAG gate mean 0.0010 for 20 steps")


def _dies() -> None:
    os._exit(3)


class _Unpicklable(Exception):
    def __init__(self, handle):
        super().__init__("carries a lock")
        self.handle = handle


def _raises_unpicklable() -> None:
    import threading
    raise _Unpicklable(threading.Lock())


def test_result_threads_and_progress_come_back_in_order():
    seen = []
    out = run_in_worker(_threads_and_pid, 2.0, threads=1, on_progress=seen.append)
    assert out["pid"] != os.getpid() and out["threads"] == 1 and out["sum"] == 12.0
    assert seen == [{"step": s, "value": 2.0 * s} for s in range(3)]


def test_the_workers_exception_is_raised_here_with_its_type():
    with pytest.raises(GateCollapse, match="MAG gate mean 0.0010"):
        run_in_worker(_collapses)


def test_an_exception_that_does_not_pickle_comes_back_as_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)_raises_unpicklable failed in its worker process.*carries a lock"):
        run_in_worker(_raises_unpicklable)


def test_a_worker_that_dies_without_a_result_is_an_error_naming_its_exit_code():
    with pytest.raises(WorkerDied, match="exited with code 3"):
        run_in_worker(_dies)
