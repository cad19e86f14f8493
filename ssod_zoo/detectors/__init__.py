"""Post-hoc OOD detectors behind one interface: ``fit(features, labels, classifier)``, ``score(features, logits)``.

One file per detector, with its formula and paper; :data:`DETECTORS` maps the names evaluation uses to the
classes, so a caller does ``DETECTORS[name]().fit(...).score(...)`` and never branches on the name. The math
lives in :mod:`ssod_zoo.scores` (pure functions, and the fitted statistics with their own ``fit``/``__call__``).
Every score is higher = more in-distribution.
"""
from typing import Any, Dict, Type

from ._base import Detector
from .energy import Energy
from .knn import KNN
from .mahalanobis import Mahalanobis
from .maxlogit import MaxLogit
from .msp import MSP
from .odin import ODIN
from .react import ReAct
from .vim import ViM

__all__ = ['DETECTORS', 'Detector', 'Energy', 'KNN', 'Mahalanobis', 'MaxLogit', 'MSP', 'ODIN', 'ReAct', 'ViM',
           'create_detector']

DETECTORS: Dict[str, Type[Detector]] = {
    'msp': MSP, 'maxlogit': MaxLogit, 'energy': Energy, 'odin': ODIN,
    'react': ReAct, 'knn': KNN, 'mahalanobis': Mahalanobis, 'vim': ViM,
}


def create_detector(name: str, **kwargs: Any) -> Detector:
    """``DETECTORS[name](**kwargs)``, with an error that lists the names."""
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise ValueError(f'unknown detector {name!r}; one of {", ".join(DETECTORS)}') from None
    return cls(**kwargs)
