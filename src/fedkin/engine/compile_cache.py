"""Persistent compile caches: a second run of the same config compiles from disk.

TorchInductor keeps two on-disk caches, both on by default in torch ≥ 2.5: the FX graph cache
(generated and built kernels, keyed by the graph, its input shapes and torch's version and
config) and the AOT autograd cache (the traced joint graph). They live under one directory,
``TORCHINDUCTOR_CACHE_DIR`` (torch's default is a per-user directory in ``/tmp``, lost on
reboot). fedkin points it at ``<user cache dir>/fedkin/torch-compile`` (``platformdirs``:
``~/.cache`` or ``$XDG_CACHE_HOME`` on Linux, ``~/Library/Caches`` on macOS) unless the user has
set ``TORCHINDUCTOR_CACHE_DIR`` themselves. What stays per process is Dynamo's bytecode
tracing; what a warm cache saves is Inductor's code generation and C++ builds.

The directory holds only derived artifacts: deleting it (``rm -r``) is always safe — the next
compile is a cold one and refills it.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir() -> Path:
    """``<user cache dir>/fedkin/torch-compile``."""
    return platformdirs.user_cache_path("fedkin") / "torch-compile"


def use_persistent_cache() -> Path:
    """Point TorchInductor's caches at :func:`default_cache_dir` unless ``TORCHINDUCTOR_CACHE_DIR``
    is already set (by the user, or by an earlier call); returns the directory in use. Call
    before the first compile of the process (Inductor reads the variable when it compiles)."""
    if ENV not in os.environ:
        os.environ[ENV] = str(default_cache_dir())
    return Path(os.environ[ENV])
