"""Backends: where a cohort's local training runs.

* ``local`` (default) — in this process, on the configured engine.
* ``ray`` — the cohort is sharded across Ray workers, each running the vectorized engine on
  its shard (``pip install fedkin[ray]``); see :mod:`fedkin.backends.ray_backend`.
* ``flower`` — ``fedkin run`` hands the whole experiment to Flower's Simulation Runtime: one
  virtual SuperNode per client, fedkin's ServerApp and ClientApp (``pip install
  fedkin[flower]``); see :mod:`fedkin.backends.flower_app`.

A local or Ray backend wraps an engine and exposes the same ``map(fn, args, in_dims)``; the
experiment loop does not know which one it runs on. Under Flower each node runs its cohort of
one on the configured engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class LocalBackendConfig(BaseModel):
    """Run cohorts in this process."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["local"] = "local"

    def wrap(self, engine):
        return engine


class RayBackendConfig(BaseModel):
    """Shard each cohort across Ray workers, each vectorized (needs the `ray` extra)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ray"] = "ray"
    address: str | None = Field(
        None, description="address of an existing Ray cluster; default: start a local instance"
    )
    workers: int = Field(0, ge=0, description="number of workers (0: one per available CPU)")
    on_worker_failure: Literal["retry", "drop"] = Field(
        "retry",
        description="a worker that dies mid-round: retry its shard on a new worker, or drop "
        "its clients from the round (counted as dropped_clients, never averaged in)",
    )
    max_retries: int = Field(2, ge=0, description="retries per shard before the round fails")

    def wrap(self, engine):
        from fedkin.backends.ray_backend import RayEngine

        return RayEngine(engine, self)


class FlowerBackendConfig(BaseModel):
    """Run the experiment on Flower's Simulation Runtime (needs the `flower` extra)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["flower"] = "flower"
    client_cpus: float = Field(
        1.0, gt=0, description="CPUs reserved per ClientApp actor (Flower/Ray resources)"
    )

    def wrap(self, engine):
        return engine  # each node trains its own client on the configured engine


BackendConfig = Annotated[
    LocalBackendConfig | RayBackendConfig | FlowerBackendConfig, Field(discriminator="name")
]
BACKENDS = {"local": LocalBackendConfig, "ray": RayBackendConfig, "flower": FlowerBackendConfig}
