"""User-level contribution bounding for the per-cell statistics of the DP Gaussian mixture.

A cell is one (class, cluster) pair; the releases are the concatenation over all cells of

- counts      n_c = Σ_i w_i                 (cells,)
- sums        S_c = Σ_i w_i x_i             (cells, d)
- second      Q_c = Σ_i w_i x_i x_iᵀ        (cells, d, d), or its diagonal Σ_i w_i x_i²  (cells, d)

over the rows i in cell c, every row on the sphere of radius r (fedemb.synth.embedded). The weight of
every row of user u is s_u = min(1, B / ‖c_u‖₂), where c_u counts u's rows per cell. Removing user u
changes the concatenated statistics by exactly its own weighted rows (no other weight depends on u):

- counts: ‖s_u c_u‖₂ ≤ B
- sums:   (Σ_c ‖s_u Σ_{i∈c} x_i‖²)^½ ≤ s_u (Σ_c (c_uc r)²)^½ ≤ B r
- second: the same with ‖x xᵀ‖_F = ‖x‖² ≤ r², and ‖x²‖₂ ≤ ‖x‖² for the diagonal: ≤ B r²

Classes are disjoint cells, so one release covers all classes at the cost of one (parallel
composition), while a user with rows in many classes is still bounded as a whole. L2 bounding lets a
user with rows spread over m cells weigh √m in total, against 1 for weights that sum to at most 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

SECOND_MOMENTS = ("none", "diag", "full")


def count_sensitivity(bound: float) -> float:
    return bound


def sum_sensitivity(bound: float, radius: float) -> float:
    return bound * radius


def second_moment_sensitivity(bound: float, radius: float) -> float:
    return bound * radius**2


def user_weights(users: np.ndarray, cells: np.ndarray, num_cells: int, bound: float) -> np.ndarray:
    """The weight of every row: s_u = min(1, bound / ‖c_u‖₂) of its user u."""
    return user_weights_by_index(np.unique(users, return_inverse=True)[1], cells, num_cells, bound)


def user_weights_by_index(user_index: np.ndarray, cells: np.ndarray, num_cells: int, bound: float) -> np.ndarray:
    """`user_weights` with users already numbered 0..U-1 (np.unique's inverse), so that repeated
    releases over the same rows sort the user ids once."""
    if len(user_index) == 0:
        return np.zeros(0, dtype=np.float64)
    keys, counts = np.unique(user_index.astype(np.int64) * num_cells + cells, return_counts=True)
    squared = np.bincount(keys // num_cells, weights=counts.astype(np.float64) ** 2)
    scale = np.minimum(1.0, bound / np.sqrt(squared))
    return scale[user_index]


@dataclass
class CellStatistics:
    counts: np.ndarray  # (cells,)
    sums: np.ndarray  # (cells, d)
    second: np.ndarray | None  # (cells, d) diagonal or (cells, d, d) full


def cell_statistics(x: np.ndarray, cells: np.ndarray, weights: np.ndarray, num_cells: int,
                    second: str = "none") -> CellStatistics:
    n, d = x.shape
    counts = np.bincount(cells, weights=weights, minlength=num_cells).astype(np.float64)
    weighted_rows = sparse.csr_matrix((weights.astype(np.float32), (cells, np.arange(n))), shape=(num_cells, n))
    sums = np.asarray(weighted_rows @ x, dtype=np.float64)
    moments = None
    if second == "diag":
        moments = np.asarray(weighted_rows @ (x * x), dtype=np.float64)
    elif second == "full":
        moments = np.zeros((num_cells, d, d), dtype=np.float64)
        order = np.argsort(cells, kind="stable")
        edges = np.searchsorted(cells[order], np.arange(num_cells + 1))
        for c in range(num_cells):
            rows = order[edges[c]:edges[c + 1]]
            if len(rows):
                moments[c] = (x[rows].T * weights[rows].astype(np.float32)) @ x[rows]
    return CellStatistics(counts, sums, moments)
