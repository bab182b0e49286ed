"""Counter-based randomness: every random number is a pure function of (seed, counters…).

fedkin never draws from a global RNG on the training path. A draw for client ``c`` in
round ``r`` is ``hash(seed, r, c, position)``, so results do not depend on cohort order,
engine (vectorized or sequential), backend or on how many clients ran before — and a
resumed run reproduces an uninterrupted one exactly.

The hash is Chris Wellons' ``lowbias32`` integer mixer applied in a chain, vectorized with
int64 tensor ops (values are kept in ``[0, 2**32)``; products are masked back to 32 bits).

Devices: the integer prefix of a chain (the seed, a stream's path, integer counters) is hashed
in Python, so a draw creates tensors only from its tensor counters and lands on their device
(the data's device, ``engine.device``); a draw from integer counters alone is a CPU tensor.
Keys are exact integer arithmetic and uniforms ``(h + 1/2) / 2^32`` are exact in float64, so
both are bitwise the same on every device; normals go through float64 ``log``/``cos``, whose
last bit may differ between device math libraries (float64 is also what MPS lacks).
"""

from __future__ import annotations

import numbers

import torch

_MASK32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """:func:`_mix32` on a Python int (the same 32-bit arithmetic, no tensor)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 finalizer on int64 tensors holding 32-bit values (in place on its own copy)."""
    x = x & _MASK32
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def _extend(h: int | torch.Tensor, *counters: int | torch.Tensor) -> torch.Tensor:
    """The chain step: the hash of ``(…, *counters)`` from the hash ``h`` of ``(…)`` (a Python
    int while every counter so far was one; a tensor on the counters' device after)."""
    for c in counters:
        if isinstance(c, numbers.Integral):
            c = _mix32_int(int(c) + 0x632BE5AB)
        else:  # a tensor stays where it is; arrays and lists are CPU counters
            where = c.device if isinstance(c, torch.Tensor) else "cpu"
            c = _mix32(torch.as_tensor(c, dtype=torch.int64, device=where) + 0x632BE5AB)
        h = _mix32_int(h ^ c) if isinstance(h, int) and isinstance(c, int) else _mix32(h ^ c)
    if isinstance(h, int):
        return torch.tensor(h, dtype=torch.int64, device="cpu")
    return h


def hash_counters(seed: int, *counters: int | torch.Tensor) -> torch.Tensor:
    """32-bit hash of ``(seed, *counters)``; tensor counters broadcast against each other."""
    return _extend(_mix32_int((seed & _MASK32) ^ 0x9E3779B9), *counters)


def _to_uniform(h: torch.Tensor) -> torch.Tensor:
    return (h.to(torch.float64) + 0.5) / 2.0**32


def uniform(seed: int, *counters: int | torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float64 draws, one per broadcast element of the counters (never exactly 0)."""
    return _to_uniform(hash_counters(seed, *counters))


def normal(seed: int, *counters: int | torch.Tensor) -> torch.Tensor:
    """Standard normal float64 draws via Box–Muller on the uniforms of ``(*counters, 0)`` and
    ``(*counters, 1)`` (the shared prefix is hashed once)."""
    h = hash_counters(seed, *counters)
    u1, u2 = _to_uniform(_extend(h, 0)), _to_uniform(_extend(h, 1))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def permutation_keys(seed: int, *counters: int | torch.Tensor) -> torch.Tensor:
    """Sort keys whose argsort is a uniformly random permutation (ties have probability ~2^-32)."""
    return hash_counters(seed, *counters)


class Stream:
    """Named sub-streams of one seed, so unrelated uses never share draws.

    ``Stream(seed).child("cohort")`` and ``Stream(seed).child("batches")`` are independent.
    """

    def __init__(self, seed: int, path: tuple[int, ...] = ()) -> None:
        self.seed = int(seed)
        self.path = path

    def child(self, name: str | int) -> Stream:
        tag = name if isinstance(name, int) else int(hash_counters(0, *name.encode()).item())
        return Stream(self.seed, (*self.path, tag))

    def uniform(self, *counters: int | torch.Tensor) -> torch.Tensor:
        return uniform(self.seed, *self.path, *counters)

    def normal(self, *counters: int | torch.Tensor) -> torch.Tensor:
        return normal(self.seed, *self.path, *counters)

    def keys(self, *counters: int | torch.Tensor) -> torch.Tensor:
        return permutation_keys(self.seed, *self.path, *counters)

    def generator(self, *counters: int) -> torch.Generator:
        """A torch.Generator seeded from this stream, for code that needs a conventional RNG
        (data generation, model init); never used on the per-client training path."""
        g = torch.Generator(device="cpu")
        g.manual_seed(int(hash_counters(self.seed, *self.path, *counters).item()))
        return g
