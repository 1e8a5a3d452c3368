"""Dictionary update rules (pure torch).

* :mod:`~skdict.updates.atoms` -- initialisation, unit-norm projection, dead-atom
  resampling and the forgetting schedule, shared by every learner;
* :mod:`~skdict.updates.online` -- online block-coordinate descent on dense
  sufficient statistics (Mairal et al. 2010);
* :mod:`~skdict.updates.hebbian` -- Olshausen & Field's gradient step;
* :mod:`~skdict.updates.sparse_stats` -- sparse statistics and atom refresh for
  dictionaries with many atoms.
"""

from .atoms import (  # noqa: F401
    dead_atoms,
    forgetting_factor,
    init_atoms,
    project_unit_norm,
    resample_dead_atoms,
    update_since_used,
)
from .hebbian import hebbian_update  # noqa: F401
from .online import OnlineStats, bcd_update, statistics_update  # noqa: F401
from .sparse_stats import SparseStats, refresh_atoms  # noqa: F401
