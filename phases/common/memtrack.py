"""Bytes that tensors hold, measured without a GPU: the CPU analog of ``torch.cuda.max_memory_allocated``.

``AllocatedBytes`` watches every tensor an operator returns (forward, backward and optimizer alike) and
counts its storage once until the storage is freed, so ``peak`` is the most bytes alive at once. An output
that shares storage with one of the operator's inputs (a view, ``detach``, an in-place update) allocated
nothing and is not counted: otherwise every parameter a layer reads through ``.t()`` and every optimizer
state updated in place would count as new. It does not see tensors that existed before it started (the
parameters, the optimizer states): a caller adds those. Unlike
peak RSS it is deterministic: it reads tensor sizes, not what the allocator happens to keep.
``saved_bytes`` is narrower: what autograd keeps for backward in one forward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocatedBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}  # storage data_ptr -> weakref whose callback uncounts it

    def _free(self, ptr: int, nbytes: int) -> None:
        self._refs.pop(ptr, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr, n = st.data_ptr(), st.nbytes()
                if n and ptr not in self._refs and ptr not in inputs:  # views and in-place results share a counted storage
                    self._refs[ptr] = weakref.ref(st, lambda _, p=ptr, n=n: self._free(p, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def saved_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), bytes of the distinct storages autograd saved for backward while fn ran)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
