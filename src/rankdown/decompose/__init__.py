"""Pure tensor maths: no nn.Module here. Each function works in float64 internally (the matrices
of conv/linear layers are small enough that accuracy is worth more than the time) and returns
factors in the caller's dtype."""

from rankdown.decompose.svd import energy_rank, singular_values, truncated_svd
from rankdown.decompose.tucker import Tucker2Factors, tucker2

__all__ = ["Tucker2Factors", "energy_rank", "singular_values", "truncated_svd", "tucker2"]
