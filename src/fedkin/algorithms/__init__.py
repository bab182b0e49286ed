"""Algorithm registry: name → class (each class carries its pydantic ``Config``)."""

from fedkin.algorithms.adaped import AdaPeD
from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.algorithms.fedavg import FedAvg
from fedkin.algorithms.fedper import FedPer
from fedkin.algorithms.fedprox import FedProx
from fedkin.algorithms.fedrep import FedRep
from fedkin.algorithms.fml import Fml
from fedkin.algorithms.ifca import Ifca
from fedkin.algorithms.local import Local

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, Local, AdaPeD, Ifca, FedRep, FedPer, Fml)
}

__all__ = ["ALGORITHMS", "Algorithm", "ServerStep"]
