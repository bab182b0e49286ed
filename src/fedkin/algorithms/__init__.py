"""The built-in algorithms, registered in :data:`fedkin.registry.ALGORITHM_REGISTRY`.

``ALGORITHMS`` is a read-only view of that registry: name → class (each class carries its
pydantic ``Config``); it includes algorithms registered by plugins.
"""

from collections.abc import Mapping

from fedkin.algorithms.adaped import AdaPeD
from fedkin.algorithms.adept import AdeptAe, AdeptPca
from fedkin.algorithms.adept_dgm import AdeptDgm
from fedkin.algorithms.apfl import Apfl
from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.algorithms.ditto import Ditto
from fedkin.algorithms.fedavg import FedAvg
from fedkin.algorithms.fedavg_ft import FedAvgFt
from fedkin.algorithms.fedkseed import FedKSeed
from fedkin.algorithms.fedper import FedPer
from fedkin.algorithms.fedprox import FedProx
from fedkin.algorithms.fedrep import FedRep
from fedkin.algorithms.fml import Fml
from fedkin.algorithms.ifca import Ifca
from fedkin.algorithms.l2gd import L2gd
from fedkin.algorithms.local import Local
from fedkin.algorithms.perfedavg import PerFedAvg
from fedkin.algorithms.pfedme import PFedMe
from fedkin.algorithms.quped import QuPeD
from fedkin.algorithms.qupel import QuPeL
from fedkin.algorithms.spire import Spire
from fedkin.registry import ALGORITHM_REGISTRY, register_algorithm

for _cls in (
    FedAvg,
    FedProx,
    Local,
    FedAvgFt,
    Ditto,
    PFedMe,
    PerFedAvg,
    Apfl,
    L2gd,
    AdaPeD,
    Ifca,
    FedRep,
    FedPer,
    Fml,
    FedKSeed,
    QuPeL,
    QuPeD,
    AdeptAe,
    AdeptPca,
    AdeptDgm,
    Spire,
):
    register_algorithm(_cls)

ALGORITHMS: Mapping[str, type[Algorithm]] = ALGORITHM_REGISTRY.builders

__all__ = ["ALGORITHMS", "Algorithm", "ServerStep"]
