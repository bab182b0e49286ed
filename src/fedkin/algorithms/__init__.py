"""Algorithm registry: name → class (each class carries its pydantic ``Config``)."""

from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.algorithms.fedavg import FedAvg
from fedkin.algorithms.fedprox import FedProx
from fedkin.algorithms.local import Local

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedProx, Local)}

__all__ = ["ALGORITHMS", "Algorithm", "ServerStep"]
