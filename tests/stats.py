"""Chi-square goodness of fit without scipy (Wilson-Hilferty approximation of the p-value)."""

import math


def chi_square_pvalue(observed, expected_probs, min_expected=5.0):
    """Pool cells with expected count < min_expected into one; return (stat, dof, p_value)."""
    n = sum(observed)
    cells, pool_o, pool_e = [], 0.0, 0.0
    for o, p in zip(observed, expected_probs):
        e = n * p
        if e < min_expected:
            pool_o += o
            pool_e += e
        else:
            cells.append((o, e))
    if pool_e > 0:
        cells.append((pool_o, pool_e))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    # any observation where the expected probability is exactly zero is an outright failure
    if any(o > 0 and p == 0 for o, p in zip(observed, expected_probs)):
        return float("inf"), len(cells) - 1, 0.0
    dof = max(len(cells) - 1, 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return stat, dof, 0.5 * math.erfc(z / math.sqrt(2))
