"""Redundancy-reduction methods: the weight of the decorrelation term against the invariance
term (Barlow Twins' lambda, Zbontar et al. 2021, Fig. 4; VICReg's lambda/mu/nu, Bardes et al.
2022, Table 7)."""

from tune_spaces.common import COMMON, Space

BARLOW_TWINS: Space = {**COMMON, "method.lambda_offdiag": {"loguniform": [1e-3, 5e-2]}}

VICREG: Space = {
    **COMMON,
    "method.sim_weight": {"uniform": [10.0, 50.0]},
    "method.var_weight": {"uniform": [10.0, 50.0]},
}
