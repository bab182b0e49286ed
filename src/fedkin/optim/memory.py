"""Measured memory of one client's local step and of inference, on CPU.

**Method.** :func:`peak_bytes` runs a function under ``torch.profiler`` with
``profile_memory=True``: the CPU allocator then reports every tensor allocation and free
(``[memory]`` events with signed byte counts and timestamps). Their running sum, in time order,
is the live tensor memory allocated since the function started; its maximum is the function's
peak. This is exact for tensor storage (every byte PyTorch's CPU allocator hands out,
including temporaries inside kernels that allocate through it) and deterministic, unlike
process RSS (``ru_maxrss``), which is a per-process high-water mark that also counts the
interpreter, imported libraries and allocator caching (glibc keeps freed arenas, and fedkin's
engine asks it to keep 1 GiB) and so needs a fresh subprocess per measurement and still cannot
resolve a ~100 kB model. It does not see memory that bypasses PyTorch's allocator (Python
objects, a BLAS library's private scratch buffers).

**What is counted.** A client's footprint is what it holds before the computation (its
weights θ, its optimizer state, the batch) plus the peak of what the computation allocates:

    inference = |θ| + |x| + peak(forward, no autograd),
    step      = |θ| + |state| + |x, y| + peak(one step: gradient or SPSA estimate, update).

The weights, state and batch input are held in the dtypes the local solver holds them in (an
optimizer with a ``dtype``, e.g. bf16: :func:`~fedkin.optim.optimizer.working`);
:func:`held_bytes` measures the storage behind the weights and state after one step.

A step works on weights the client owns (as a deployed client, or the sequential engine's
local solve, which copies the received model once): MeZO's step perturbs and updates them in
place; a first-order step keeps the gradient, the activations saved for backward and, being
functional, the new weights beside the old ones at its peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fedkin.core.tree import Tree, tree_leaves, tree_map
from fedkin.optim.optimizer import Optimizer, working

Objective = Callable[[Tree, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
MB = 1e6


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak live tensor bytes allocated by ``fn()`` above what was allocated when it started
    (CPU allocator events of ``torch.profiler``; see module doc)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for _, n in sorted(events, key=lambda e: e[0]):
        live += n
        peak = max(peak, live)
    return peak


def tree_bytes(tree: Any) -> int:
    """Bytes of the tensors of a tree (or a tensor, or a tuple of them)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, tuple):
        return sum(tree_bytes(t) for t in tree)
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree))


def inference_bytes(forward: Callable[[Tree, torch.Tensor], Any], params: Tree, x) -> int:
    """|θ| + |x| + the peak of ``forward(θ, x)`` without autograd."""

    def run() -> None:
        with torch.no_grad():
            forward(params, x)

    return tree_bytes(params) + tree_bytes(x) + peak_bytes(run)


def storage_bytes(tree: Any) -> int:
    """Bytes of the storages behind a tree's tensors (``untyped_storage().nbytes()``, each
    storage once): what holding them costs, whatever their dtype or views."""
    storages = {}
    for t in tree_leaves(tree) if not isinstance(tree, torch.Tensor) else [tree]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _client(optimizer: Optimizer, params: Tree, x: torch.Tensor) -> tuple[Tree, Tree, Any]:
    """What a client holds before a local step: its own copy of θ, the optimizer state and the
    batch input, in the local solver's working dtype."""
    params = tree_map(lambda t: t.clone(memory_format=torch.contiguous_format), params)
    params = working(optimizer, params)
    return params, optimizer.init(params), working(optimizer, x)


def _step(objective: Objective, optimizer: Optimizer, params: Tree, state: Tree, x, y):
    """One local step as a function of nothing (its SPSA key made beforehand)."""
    from fedkin.algorithms.base import Algorithm  # the local solver's step (algorithms → optim)

    key = None if optimizer.estimator is None else optimizer.estimator.key(0)

    def run() -> tuple[Tree, Tree]:
        g, _ = Algorithm.local_gradient(objective, params, optimizer, x, y, key)
        return optimizer.step(g, state, params)

    return run


def step_bytes(
    objective: Objective, optimizer: Optimizer, params: Tree, x: torch.Tensor, y: torch.Tensor
) -> int:
    """|θ| + |state| + |x, y| + the peak of one local step of ``optimizer`` on ``objective`` at
    θ — exactly what :meth:`~fedkin.algorithms.base.Algorithm.local_solve` does per step
    (``local_gradient``: backprop, SAM's two gradients or the SPSA estimate; then
    ``optimizer.step``) — on a private copy of θ that the step may update in place."""
    params, state, x = _client(optimizer, params, x)
    return (
        tree_bytes(params)
        + tree_bytes(state)
        + tree_bytes((x, y))
        + peak_bytes(_step(objective, optimizer, params, state, x, y))
    )


def held_bytes(
    objective: Objective, optimizer: Optimizer, params: Tree, x: torch.Tensor, y: torch.Tensor
) -> tuple[int, int]:
    """(weights, optimizer state): the storage bytes (:func:`storage_bytes`) of what a client
    holds after one local step of ``optimizer`` from θ, as the local solver holds them."""
    params, state, x = _client(optimizer, params, x)
    params, state = _step(objective, optimizer, params, state, x, y)()
    return storage_bytes(params), storage_bytes(state)
