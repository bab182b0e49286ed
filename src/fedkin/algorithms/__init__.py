"""Algorithm registry: name → class (each class carries its pydantic ``Config``)."""

from fedkin.algorithms.adaped import AdaPeD
from fedkin.algorithms.apfl import Apfl
from fedkin.algorithms.base import Algorithm, ServerStep
from fedkin.algorithms.ditto import Ditto
from fedkin.algorithms.fedavg import FedAvg
from fedkin.algorithms.fedavg_ft import FedAvgFt
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

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
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
        QuPeL,
        QuPeD,
    )
}

__all__ = ["ALGORITHMS", "Algorithm", "ServerStep"]
