"""Linear algebra for the spectral methods: top-k SVDs (exact or randomized), polar factors, low-rank updates.

All of it runs on the tensor's own device, in float32 (or float64 when the merge computes in float64), never in
16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# cuSOLVER's QR-based SVD: slower than the Jacobi driver on small matrices, but it is the one whose accuracy does
# not depend on convergence settings, and it is what "exact" promises.
CUDA_SVD_DRIVER = "gesvd"
ROW_CHUNK = 1 << 14  # rows per step of chunked products: bounds their scratch
# Singular values below this fraction of the largest are treated as zero by the Gram polar factor: far enough
# below float32's resolution that every direction the float32 input can resolve is kept (as an SVD would), and
# above the float64 Gram's noise floor (~1e-8), where exactly repeated directions (a task merged with its copy) land.
POLAR_RCOND = 1e-7
WHITENING_BLOCK_BYTES = 1 << 28  # float64 scratch per step of the polar factor's product


SVD_ROUTES = ("exact", "gram", "randomized")  # routes to a matrix's singular triplets


@dataclass(frozen=True)
class Decomposition:
    """One decomposition a merge runs, as the cost model sees it.

    route: exact (LAPACK / cuSOLVER SVD of rows x cols), gram (singular triplets from the float64 Gram matrix),
    randomized (`sketch` columns and `power_iters` subspace iterations), polar (the Gram polar factor of a tall
    rows x cols matrix) or spectrum (its singular values from the Gram matrix). The routes run at very different
    rates, so flops are counted per route.
    """

    route: str
    rows: int
    cols: int
    sketch: int = 0
    power_iters: int = 0

    @property
    def is_svd(self) -> bool:
        return self.route in SVD_ROUTES

    def flops(self) -> float:
        long, short = max(self.rows, self.cols), min(self.rows, self.cols)
        if self.route == "randomized":
            return (2 + 4 * self.power_iters) * self.rows * self.cols * self.sketch
        if self.route == "gram":
            return 4.0 * long * short**2 + 9.0 * short**3  # float64 Gram, eigh, U = A V / S
        if self.route == "exact":
            return 14.0 * long * short**2 + 8.0 * short**3  # thin SVD with both factors
        if self.route == "polar":
            return 4.0 * long * short**2 + 9.0 * short**3  # Gram, eigh, and the whitening product
        if self.route == "spectrum":
            return 2.0 * long * short**2 + 4.0 * short**3  # Gram and eigenvalues only
        raise ValueError(self.route)


def svd_route(rows: int, cols: int, rank: int, backend: str, oversample: int, power_iters: int) -> Decomposition:
    """The decomposition `top_svd(matrix, rank, backend, ...)` runs on a rows x cols matrix."""
    backend = resolve_backend(backend, rank, oversample, min(rows, cols))
    if backend == "randomized":
        return Decomposition("randomized", rows, cols, min(rank + oversample, rows, cols), power_iters)
    return Decomposition(backend, rows, cols)


def polar_route(rows: int, cols: int, method: str) -> Decomposition:
    """The decomposition `polar(matrix, method)` runs on a tall rows x cols matrix."""
    return Decomposition("polar" if method == "gram" else "exact", rows, cols)


def energy_svd_routes(rows: int, cols: int, cap: int, backend: str, oversample: int,
                      power_iters: int) -> list[Decomposition]:
    """Every decomposition `top_svd_by_energy` may run, in order: it stops after any of them once the energy
    share is reached, so this is an upper bound of what it runs."""
    full_rank, routes = min(rows, cols), []
    rank = min(cap, 64)
    while resolve_backend(backend, rank, oversample, full_rank) == "randomized":
        routes.append(Decomposition("randomized", rows, cols, min(rank + oversample, rows, cols), power_iters))
        if rank >= cap:
            return routes
        rank = min(cap, 2 * rank)
    return routes + [Decomposition(resolve_backend(backend, cap, oversample, full_rank), rows, cols)]


@dataclass
class Factors:
    """Leading singular triplets of one matrix: A ~= U diag(S) V^T, with how they were computed."""

    U: torch.Tensor  # rows x k
    S: torch.Tensor  # k
    V: torch.Tensor  # cols x k
    backend: str

    def top(self, k: int) -> "Factors":
        """The k leading triplets, copied out so that the full factors can be freed."""
        if k >= self.S.numel():
            return self
        return Factors(self.U[:, :k].contiguous(), self.S[:k].clone(), self.V[:, :k].contiguous(), self.backend)


def exact_svd(matrix: torch.Tensor) -> Factors:
    """LAPACK's / cuSOLVER's SVD. A matrix at least twice as tall as wide (or wide as tall) is first reduced by
    QR, A = Q R, and R is decomposed: the same result, a third of the workspace, and no overflow of cuSOLVER's
    32-bit workspace size on embedding-sized matrices (128256 x 8192 fails without it)."""
    rows, cols = matrix.shape
    if max(rows, cols) < 2 * min(rows, cols) or min(rows, cols) == 0:  # an empty one: no QR to reduce by
        driver = CUDA_SVD_DRIVER if matrix.is_cuda else None
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False, driver=driver)
        return Factors(U, S, Vh.mT, "exact")
    wide = rows < cols
    q, r = torch.linalg.qr(matrix.mT if wide else matrix)
    inner = exact_svd(r)
    left = q @ inner.U
    return Factors(inner.V, inner.S, left, "exact") if wide else Factors(left, inner.S, inner.V, "exact")


def gram_svd(matrix: torch.Tensor, keep: Callable[[torch.Tensor], int] | None = None) -> Factors:
    """Leading singular triplets from the eigen-decomposition of the float64 Gram matrix of the smaller side.

    sigma_i^2 and V come from eigh(A^T A) in float64, so squaring the condition number costs nothing at float32
    precision; U = A V / sigma, computed only for the `keep(singular_values)` leading triplets (all by default).
    The rank-k reconstruction agrees with LAPACK's SVD to float32 round-off (tests pin it); on a GPU this is
    about 9x faster than cuSOLVER's SVD of a 28672 x 8192 matrix and needs a third of its workspace
    (benchmarks/results/svd/svd_cuda.md).
    """
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.mT if wide else matrix
    eigenvalues, vectors = torch.linalg.eigh(gram64(tall))
    singular_values = eigenvalues.flip(0).clamp(min=0).sqrt().to(matrix.dtype)
    k = keep(singular_values) if keep else singular_values.numel()
    singular_values = singular_values[:k].clone()
    right = vectors.flip(1)[:, :k].to(matrix.dtype)
    left = tall @ right
    left.div_(torch.where(singular_values > 0, singular_values, 1.0))
    return Factors(right, singular_values, left, "gram") if wide else Factors(left, singular_values, right, "gram")


def full_svd(matrix: torch.Tensor, backend: str, keep: Callable[[torch.Tensor], int] | None = None) -> Factors:
    """The leading `keep(singular_values)` triplets (all by default), by `backend`: exact (LAPACK / cuSOLVER),
    or gram (which then computes only those)."""
    if backend == "gram":
        return gram_svd(matrix, keep)
    factors = exact_svd(matrix)
    return factors.top(keep(factors.S)) if keep else factors


def resolve_backend(backend: str, rank: int, oversample: int, full_rank: int) -> str:
    """auto: randomized when the sketch is small against the full rank; otherwise the Gram route, faster than
    LAPACK's and cuSOLVER's SVD on every shape measured (an H100: 9x on 28672 x 8192; 2 CPU cores: 1.5-1.9x on
    a 0.5B Llama's shapes, 1.5x on a whole tsvm merge: benchmarks/results/svd/svd_cpu_0.5b_shapes.md) and equal to
    it up to float32 round-off wherever the spectrum has a gap at the cut."""
    if backend != "auto":
        return backend
    return "randomized" if sketch_fits(rank, oversample, full_rank) else "gram"


def randomized_svd(matrix: torch.Tensor, columns: int, power_iters: int,
                   test_matrix: Callable[[tuple[int, int]], torch.Tensor]) -> Factors:
    """Halko, Martinsson & Tropp's randomized SVD with `columns` sketch columns and subspace iterations.

    `test_matrix(shape)` supplies the random sketch (keyed draws, so the result does not depend on the device
    or worker); its entries are centred uniforms, which sketch a range as well as Gaussians do.
    """
    rows, cols = matrix.shape
    columns = min(columns, rows, cols)
    omega = test_matrix((cols, columns)).to(matrix.dtype).sub_(0.5)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    small = exact_svd(basis.mT @ matrix)
    return Factors(basis @ small.U, small.S, small.V, "randomized")


def sketch_fits(rank: int, oversample: int, full_rank: int) -> bool:
    """Whether a randomized SVD of this rank is worth it: its sketch is at most a quarter of the full rank."""
    return 4 * (rank + oversample) <= full_rank


def top_svd(matrix: torch.Tensor, rank: int, backend: str, oversample: int, power_iters: int,
            test_matrix) -> Factors:
    """The `rank` leading singular triplets, by backend: exact, gram, randomized, or auto (resolve_backend)."""
    backend = resolve_backend(backend, rank, oversample, min(matrix.shape))
    if backend == "randomized":
        return randomized_svd(matrix, rank + oversample, power_iters, test_matrix).top(rank)
    return full_svd(matrix, backend, keep=lambda singular_values: rank)


def energy_rank(singular_values: torch.Tensor, total_energy: float, eta: float) -> int | None:
    """Smallest k whose leading singular values hold a share `eta` of `total_energy` (None if they don't)."""
    cumulative = torch.cumsum(singular_values.double() ** 2, 0)
    reached = (cumulative >= eta * total_energy).nonzero()
    return int(reached[0]) + 1 if len(reached) else None


def top_svd_by_energy(matrix: torch.Tensor, eta: float, cap: int, backend: str, oversample: int,
                      power_iters: int, test_matrix) -> Factors:
    """Leading triplets up to the smallest rank holding a share `eta` of the matrix's energy (at most `cap`).

    The energy is ||matrix||_F^2, known without an SVD. With auto or randomized, sketches grow from 64 columns,
    doubling, until the share is reached or the cap is; auto moves to a full SVD (resolve_backend) once a
    sketch would be larger than a quarter of the full rank.
    """
    full_rank = min(matrix.shape)
    total = float(torch.linalg.vector_norm(matrix, dtype=torch.float64) ** 2)
    if total == 0.0:  # nothing to keep: no triplets (even a zero one would overfill a budget of floor(r/T) = 0)
        return Factors(matrix.new_zeros(matrix.shape[0], 0), matrix.new_zeros(0), matrix.new_zeros(matrix.shape[1], 0),
                       "none")
    rank = min(cap, 64)
    while resolve_backend(backend, rank, oversample, full_rank) == "randomized":
        factors = randomized_svd(matrix, rank + oversample, power_iters, test_matrix)
        k = energy_rank(factors.S[:rank], total, eta)
        if k is not None or rank >= cap:
            return factors.top(min(k or cap, cap))
        rank = min(cap, 2 * rank)
    return full_svd(matrix, resolve_backend(backend, cap, oversample, full_rank),
                    keep=lambda singular_values: min(energy_rank(singular_values, total, eta) or cap, cap))


def gram64(matrix: torch.Tensor) -> torch.Tensor:
    """matrix^T matrix accumulated in float64, a block of rows at a time."""
    cols = matrix.shape[1]
    gram = torch.zeros(cols, cols, dtype=torch.float64, device=matrix.device)
    for start in range(0, matrix.shape[0], ROW_CHUNK):
        block = matrix[start:start + ROW_CHUNK].double()
        gram.addmm_(block.mT, block)
    return gram


def polar_via_gram(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor of a tall matrix A: A (A^T A)^{-1/2}, from the eigen-decomposition of the small Gram
    matrix, in place.

    The Gram matrix squares A's condition number, so it is formed, decomposed and applied in float64; the result
    is then as accurate as A's own rounding allows (more accurate than a float32 SVD). Directions with singular
    values below POLAR_RCOND of the largest are dropped (a pseudo-inverse): merging a task with a copy of itself
    then returns that task, where an SVD would pick an arbitrary completion.
    """
    eigenvalues, vectors = torch.linalg.eigh(gram64(matrix))
    keep = eigenvalues > (POLAR_RCOND**2) * eigenvalues[-1].clamp(min=torch.finfo(torch.float64).tiny)
    inverse_root = torch.where(keep, eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    whitening = (vectors * inverse_root) @ vectors.mT
    rows = max(1, WHITENING_BLOCK_BYTES // (8 * matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        block = matrix[start:start + rows]
        block.copy_(block.double() @ whitening)
    return matrix


def singular_values_via_gram(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a tall matrix from its float64 Gram matrix (accurate to ~1e-8 of the largest)."""
    return torch.linalg.eigvalsh(gram64(matrix)).clamp(min=0).sqrt()


def polar_via_svd(matrix: torch.Tensor) -> torch.Tensor:
    factors = exact_svd(matrix)
    return factors.U @ factors.V.mT


def polar(matrix: torch.Tensor, method: str) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (tall input), by `method`: gram or svd."""
    return polar_via_gram(matrix) if method == "gram" else polar_via_svd(matrix)


class StackedFactors:
    """The tasks' leading singular triplets side by side, in one preallocated buffer per side (so the per-task
    factors can be freed as soon as they are stacked), then merged: b + scale * polar(U) diag(S) polar(V)^T."""

    def __init__(self, rows: int, cols: int, capacity: int, like: torch.Tensor):
        self.U = like.new_empty(rows, capacity)
        self.V = like.new_empty(cols, capacity)
        self.S: list[torch.Tensor] = []
        self.used = 0
        self.backends: list[str] = []

    def add(self, factors: Factors) -> None:
        k = factors.S.numel()
        self.U[:, self.used:self.used + k] = factors.U
        self.V[:, self.used:self.used + k] = factors.V
        self.S.append(factors.S)
        self.backends.append(factors.backend)
        self.used += k

    def add_to_(self, target: torch.Tensor, scale: float, polar_method: str,
                flatten: bool = False) -> torch.Tensor:
        """target += scale * U_o diag(S) V_o^T; `flatten` replaces every singular value by their mean.
        With no triplets (a matrix narrower than the number of tasks: floor(r/T) = 0) nothing is added."""
        if self.used == 0:
            return target
        U, V = self.U[:, :self.used], self.V[:, :self.used]
        S = torch.cat(self.S)
        if flatten:
            S = torch.full_like(S, float(S.mean()))
        U, V = polar(U, polar_method), polar(V, polar_method)
        return add_low_rank_(target, U, S, V, scale)


def add_low_rank_(target: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """target += scale * U diag(S) V^T, a block of rows at a time (no full-size temporary)."""
    right = (V * S).mT.contiguous()
    for start in range(0, target.shape[0], ROW_CHUNK):
        target[start:start + ROW_CHUNK].addmm_(U[start:start + ROW_CHUNK], right, alpha=scale)
    return target
