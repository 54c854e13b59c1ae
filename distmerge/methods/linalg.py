"""Linear algebra for the spectral methods: top-k SVDs (exact or randomized), polar factors, low-rank updates.

All of it runs on the tensor's own device, in float32 (or float64 when the merge computes in float64), never in
16-bit. Every routine takes a matrix [rows, cols] or a stack of them [E, rows, cols], decomposed together in
batched calls (each matrix as it would be on its own, up to round-off); a matrix takes the same calls as it always
has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

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
    """Leading singular triplets of one matrix, A ~= U diag(S) V^T (or of each matrix of a stack, with a leading
    dimension on each factor), with how they were computed."""

    U: torch.Tensor  # rows x k
    S: torch.Tensor  # k
    V: torch.Tensor  # cols x k
    backend: str

    def top(self, k: int) -> "Factors":
        """The k leading triplets, copied out so that the full factors can be freed."""
        if k >= self.S.shape[-1]:
            return self
        return Factors(self.U[..., :k].contiguous(), self.S[..., :k].clone(), self.V[..., :k].contiguous(),
                       self.backend)

    def each(self) -> list["Factors"]:
        """The factors of each matrix of a stack (views), or [self] for one matrix."""
        if self.S.dim() == 1:
            return [self]
        return [Factors(U, S, V, self.backend) for U, S, V in zip(self.U, self.S, self.V)]


TestMatrix = Callable[[tuple[int, int]], torch.Tensor]  # keyed uniform [0, 1) draws of the shape asked for


def draw_test_matrix(test_matrix: TestMatrix | Sequence[TestMatrix], shape: tuple[int, int]) -> torch.Tensor:
    """A matrix's test matrix, or a stack's: each matrix's own draw (one source per matrix), stacked."""
    if callable(test_matrix):
        return test_matrix(shape)
    return torch.stack([draw(shape) for draw in test_matrix])


def some_of(matrices, indices: list[int]):
    """Matrices `indices` of a stack (the stack itself when that is all of them: no copy), or of its test matrix
    sources; a single matrix (or its source) as it is."""
    if callable(matrices) or (isinstance(matrices, torch.Tensor) and matrices.dim() == 2):
        return matrices
    if len(indices) == len(matrices):
        return matrices
    return matrices[indices] if isinstance(matrices, torch.Tensor) else [matrices[i] for i in indices]


def rows_per_step(matrix: torch.Tensor) -> int:
    """ROW_CHUNK rows of a matrix per step of a chunked product; a stack's matrices share them, so its steps
    hold what a matrix's do."""
    return max(1, ROW_CHUNK // math.prod(matrix.shape[:-2]))


def add_matmul_(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = 1) -> torch.Tensor:
    """target += alpha * left @ right in place, for a matrix or a stack of them."""
    if target.dim() == 2:
        return target.addmm_(left, right, alpha=alpha)
    return target.baddbmm_(left, right, alpha=alpha)


def exact_svd(matrix: torch.Tensor) -> Factors:
    """LAPACK's / cuSOLVER's SVD. A matrix at least twice as tall as wide (or wide as tall) is first reduced by
    QR, A = Q R, and R is decomposed: the same result, a third of the workspace, and no overflow of cuSOLVER's
    32-bit workspace size on embedding-sized matrices (128256 x 8192 fails without it)."""
    rows, cols = matrix.shape[-2:]
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
    wide = matrix.shape[-2] < matrix.shape[-1]
    tall = matrix.mT if wide else matrix
    eigenvalues, vectors = torch.linalg.eigh(gram64(tall))
    singular_values = eigenvalues.flip(-1).clamp(min=0).sqrt().to(matrix.dtype)
    k = keep(singular_values) if keep else singular_values.shape[-1]
    singular_values = singular_values[..., :k].clone()
    right = vectors.flip(-1)[..., :k].to(matrix.dtype)
    left = tall @ right
    left.div_(torch.where(singular_values > 0, singular_values, 1.0).unsqueeze(-2))
    return Factors(right, singular_values, left, "gram") if wide else Factors(left, singular_values, right, "gram")


def full_svd(matrix: torch.Tensor, backend: str, keep: Callable[[torch.Tensor], int] | None = None) -> Factors:
    """The leading `keep(singular_values)` triplets (all by default; of a stack, the most any of its matrices
    keeps), by `backend`: exact (LAPACK / cuSOLVER), or gram (which then computes only those)."""
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
                   test_matrix: TestMatrix | Sequence[TestMatrix]) -> Factors:
    """Halko, Martinsson & Tropp's randomized SVD with `columns` sketch columns and subspace iterations.

    `test_matrix(shape)` supplies the random sketch (keyed draws, so the result does not depend on the device
    or worker; a stack has one source per matrix); its entries are centred uniforms, which sketch a range as well
    as Gaussians do.
    """
    rows, cols = matrix.shape[-2:]
    columns = min(columns, rows, cols)
    omega = draw_test_matrix(test_matrix, (cols, columns)).to(matrix.dtype).sub_(0.5)
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
    backend = resolve_backend(backend, rank, oversample, min(matrix.shape[-2:]))
    if backend == "randomized":
        return randomized_svd(matrix, rank + oversample, power_iters, test_matrix).top(rank)
    return full_svd(matrix, backend, keep=lambda singular_values: rank)


def energy_rank(singular_values: torch.Tensor, total_energy: float, eta: float) -> int | None:
    """Smallest k whose leading singular values hold a share `eta` of `total_energy` (None if they don't)."""
    cumulative = torch.cumsum(singular_values.double() ** 2, 0)
    reached = (cumulative >= eta * total_energy).nonzero()
    return int(reached[0]) + 1 if len(reached) else None


def top_svd_by_energy(matrix: torch.Tensor, eta: float, cap: int, backend: str, oversample: int,
                      power_iters: int, test_matrix) -> list[Factors]:
    """Leading triplets up to the smallest rank holding a share `eta` of the matrix's energy (at most `cap`): one
    Factors per matrix (of a stack, or the one matrix), since each matrix of a stack keeps its own rank.

    The energy is ||matrix||_F^2, known without an SVD. With auto or randomized, sketches grow from 64 columns,
    doubling, until the share is reached or the cap is; auto moves to a full SVD (resolve_backend) once a
    sketch would be larger than a quarter of the full rank. A stack's matrices still short of their share take
    each step together.
    """
    matrices = matrix.unbind(0) if matrix.dim() == 3 else (matrix,)
    full_rank = min(matrix.shape[-2:])
    totals = [float(torch.linalg.vector_norm(m, dtype=torch.float64) ** 2) for m in matrices]
    # nothing to keep in a zero matrix: no triplets (even a zero one would overfill a budget of floor(r/T) = 0)
    found = {i: no_triplets(m) for i, m in enumerate(matrices) if totals[i] == 0.0}
    rank = min(cap, 64)
    while len(found) < len(matrices) and resolve_backend(backend, rank, oversample, full_rank) == "randomized":
        searching = [i for i in range(len(matrices)) if i not in found]
        sketched = randomized_svd(some_of(matrix, searching), rank + oversample, power_iters,
                                  some_of(test_matrix, searching))
        for i, factors in zip(searching, sketched.each()):
            k = energy_rank(factors.S[:rank], totals[i], eta)
            if k is not None or rank >= cap:
                found[i] = factors.top(min(k or cap, cap))
        rank = min(cap, 2 * rank)
    searching = [i for i in range(len(matrices)) if i not in found]
    if searching:
        def kept(i: int, singular_values: torch.Tensor) -> int:
            return min(energy_rank(singular_values, totals[i], eta) or cap, cap)

        full = full_svd(some_of(matrix, searching), resolve_backend(backend, cap, oversample, full_rank),
                        keep=lambda spectra: max(map(kept, searching, spectra.reshape(-1, spectra.shape[-1]))))
        # the leading values a matrix keeps are among those kept for the stack: its own rank again
        found.update((i, factors.top(kept(i, factors.S))) for i, factors in zip(searching, full.each()))
    return [found[i] for i in range(len(matrices))]


def no_triplets(matrix: torch.Tensor) -> Factors:
    """What a zero matrix keeps: rows x 0 and cols x 0 factors."""
    return Factors(matrix.new_zeros(matrix.shape[0], 0), matrix.new_zeros(0), matrix.new_zeros(matrix.shape[1], 0),
                   "none")


def gram64(matrix: torch.Tensor) -> torch.Tensor:
    """matrix^T matrix (of each matrix of a stack) accumulated in float64, a block of rows at a time."""
    cols = matrix.shape[-1]
    gram = torch.zeros(*matrix.shape[:-2], cols, cols, dtype=torch.float64, device=matrix.device)
    step = rows_per_step(matrix)
    for start in range(0, matrix.shape[-2], step):
        block = matrix[..., start:start + step, :].double()
        add_matmul_(gram, block.mT, block)
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
    largest = eigenvalues[..., -1:].clamp(min=torch.finfo(torch.float64).tiny)  # each matrix's own
    keep = eigenvalues > (POLAR_RCOND**2) * largest
    inverse_root = torch.where(keep, eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    whitening = (vectors * inverse_root.unsqueeze(-2)) @ vectors.mT
    rows = max(1, WHITENING_BLOCK_BYTES // (8 * math.prod(matrix.shape[:-2]) * matrix.shape[-1]))
    for start in range(0, matrix.shape[-2], rows):
        block = matrix[..., start:start + rows, :]
        block.copy_(block.double() @ whitening)
    return matrix


def singular_values_via_gram(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a tall matrix from its float64 Gram matrix (accurate to ~1e-8 of the largest)."""
    return torch.linalg.eigvalsh(gram64(matrix)).clamp(min=0).sqrt()


def polar_from_svd(factors: Factors) -> torch.Tensor:
    """P Q^T from the SVD A = P diag(s) Q^T, without the directions whose singular value is below POLAR_RCOND of
    the largest, as the Gram route drops them: a rank-deficient A's null directions are otherwise whatever the
    SVD's round-off makes them, so the result would change with the LAPACK call (batched or not, CPU or GPU)."""
    keep = factors.S > POLAR_RCOND * factors.S[..., :1]
    return (factors.U * keep.unsqueeze(-2)) @ factors.V.mT


def polar_via_svd(matrix: torch.Tensor) -> torch.Tensor:
    return polar_from_svd(exact_svd(matrix))


def polar(matrix: torch.Tensor, method: str) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (tall input), by `method`: gram or svd."""
    return polar_via_gram(matrix) if method == "gram" else polar_via_svd(matrix)


class StackedFactors:
    """The tasks' leading singular triplets side by side, of a matrix or of each matrix of a stack (`like`), in
    one preallocated buffer per side (so the per-task factors can be freed as soon as they are stacked), then
    merged: b + scale * polar(U) diag(S) polar(V)^T.

    A stack's matrices may keep different numbers of triplets; the buffers start at zero, so one that keeps fewer
    has zero columns after its own, with zero singular values: they add nothing, and leave its other columns' polar
    factors as they are (both polar routes drop a zero direction)."""

    def __init__(self, rows: int, cols: int, capacity: int, like: torch.Tensor):
        batch = like.shape[:-2]
        allocate = like.new_zeros if batch else like.new_empty
        self.U = allocate(*batch, rows, capacity)
        self.V = allocate(*batch, cols, capacity)
        matrices = math.prod(batch)
        self.S: list[list[torch.Tensor]] = [[] for _ in range(matrices)]
        self.used = [0] * matrices
        self.backends: list[list[str]] = [[] for _ in range(matrices)]

    def add(self, factors: Factors, matrix: int = 0) -> None:
        """One matrix's triplets (of matrix `matrix` of a stack) after those it has."""
        k, used = factors.S.numel(), self.used[matrix]
        U, V = (self.U, self.V) if self.U.dim() == 2 else (self.U[matrix], self.V[matrix])
        U[:, used:used + k] = factors.U
        V[:, used:used + k] = factors.V
        self.S[matrix].append(factors.S)
        self.backends[matrix].append(factors.backend)
        self.used[matrix] += k

    def add_each(self, factors: Factors) -> None:
        """The triplets of the matrix, or of each matrix of the stack (factors with its leading dimension)."""
        for matrix, one in enumerate(factors.each()):
            self.add(one, matrix)

    def add_to_(self, target: torch.Tensor, scale: float, polar_method: str,
                flatten: bool = False) -> torch.Tensor:
        """target += scale * U_o diag(S) V_o^T; `flatten` replaces every singular value by their mean (each
        matrix's own). With no triplets (a matrix narrower than the number of tasks: floor(r/T) = 0) nothing is
        added."""
        width = max(self.used)
        if width == 0:
            return target
        U, V = self.U[..., :width], self.V[..., :width]
        spectra = [torch.cat(S) for S in self.S]
        if flatten:
            spectra = [torch.full_like(S, float(S.mean())) for S in spectra]
        S = spectra[0] if U.dim() == 2 else torch.stack([torch.nn.functional.pad(S, (0, width - S.numel()))
                                                         for S in spectra])
        U, V = polar(U, polar_method), polar(V, polar_method)
        return add_low_rank_(target, U, S, V, scale)


def add_low_rank_(target: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """target += scale * U diag(S) V^T, a block of rows at a time (no full-size temporary)."""
    right = (V * S.unsqueeze(-2)).mT.contiguous()
    step = rows_per_step(target)
    for start in range(0, target.shape[-2], step):
        add_matmul_(target[..., start:start + step, :], U[..., start:start + step, :], right, alpha=scale)
    return target
