"""Pure tensor maths: no nn.Module here. Each function works in float64 internally (the matrices
of conv/linear layers are small enough that accuracy is worth more than the time) and returns
factors in the caller's dtype."""

from rankdown.decompose.basis import BasisFilters, basis_filters
from rankdown.decompose.cp import CPFactors, cp
from rankdown.decompose.denton import (
    Biclustered,
    BiclusteredCP,
    Monochromatic,
    balanced_kmeans,
    biclustered,
    biclustered_cp,
    monochromatic,
)
from rankdown.decompose.evbmf import EVBMFResult, evbmf
from rankdown.decompose.svd import (
    energy_rank,
    randomized_svd,
    separable,
    separable_unfolding,
    shifted_cholesky,
    singular_values,
    truncated_svd,
    whitened_truncated_svd,
)
from rankdown.decompose.tt import TTMatrix, factorize_dim, tt_full_ranks, tt_matrix
from rankdown.decompose.tucker import Tucker2Factors, tucker2

__all__ = [
    "BasisFilters",
    "Biclustered",
    "BiclusteredCP",
    "CPFactors",
    "EVBMFResult",
    "Monochromatic",
    "TTMatrix",
    "Tucker2Factors",
    "balanced_kmeans",
    "basis_filters",
    "biclustered",
    "biclustered_cp",
    "cp",
    "energy_rank",
    "evbmf",
    "factorize_dim",
    "monochromatic",
    "randomized_svd",
    "separable",
    "separable_unfolding",
    "shifted_cholesky",
    "singular_values",
    "truncated_svd",
    "tt_full_ranks",
    "tt_matrix",
    "tucker2",
    "whitened_truncated_svd",
]
