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
from fedkin.optim.optimizer import Optimizer

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


def step_bytes(
    objective: Objective, optimizer: Optimizer, params: Tree, x: torch.Tensor, y: torch.Tensor
) -> int:
    """|θ| + |state| + |x, y| + the peak of one local step of ``optimizer`` on ``objective`` at
    θ — exactly what :meth:`~fedkin.algorithms.base.Algorithm.local_solve` does per step
    (``local_gradient``: backprop, SAM's two gradients or the SPSA estimate; then
    ``optimizer.step``) — on a private copy of θ that the step may update in place."""
    from fedkin.algorithms.base import Algorithm  # the local solver's step (algorithms → optim)

    params = tree_map(lambda t: t.clone(memory_format=torch.contiguous_format), params)
    state = optimizer.init(params)
    key = None if optimizer.estimator is None else optimizer.estimator.key(0)

    def run() -> None:
        g, _ = Algorithm.local_gradient(objective, params, optimizer, x, y, key)
        optimizer.step(g, state, params)

    return tree_bytes(params) + tree_bytes(state) + tree_bytes((x, y)) + peak_bytes(run)
