"""The method registry: a merge method is a plain function, registered once with its parameter declarations.

    @merge_method("ties", needs_base=True, params=(WEIGHT, DENSITY, LAMBDA, ...), summary="...")
    def ties(base, models, p, ctx): ...

The function receives the base tensor (or None), the fine-tuned tensors stacked as `models` [T, *shape] in the
compute dtype (the function may overwrite them; it owns them), the parameters resolved for this tensor as a
dict (per-model ones as lists of T values), and a `TensorContext`. It returns the merged tensor. Parameters are
validated from their declarations before any tensor is read.

Everything else the system must know about a method is declared beside it, in the same decorator: what a
`base_model` is to it (`needs_base`, `optional_base`, `base_is_model`), `work` (the decompositions and scratch
memory of one tensor, for `distmerge plan` and the unit order) and `first_pass` (a statistic of the whole model
that the merge needs before it starts, as TIES' global trimming). Planner, engine and runtimes run these without
knowing what they compute.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ConfigError
from .linalg import Decomposition
from .sampling import generator_from_state, uniform


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    kind: "float", "int", "bool", "globs" (a list of tensor-name patterns), or a tuple of allowed strings.
    per_model: set per model (a list of T values reaches the method) rather than once for the merge.
    lo/hi: the allowed range; `lo_open`/`hi_open` exclude the end itself.
    bool_map: what mergekit's boolean spelling of a choice means (e.g. `rescale: true` is L1 rescaling).
    alias: mergekit's name for the same parameter (e.g. `normalize` for `aggregate`).
    """

    name: str
    kind: Any
    default: Any
    doc: str
    per_model: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    bool_map: dict | None = None
    alias: str | None = None

    def describe_range(self) -> str:
        if isinstance(self.kind, tuple):
            return " | ".join(self.kind)
        if self.kind in ("bool", "globs"):
            return self.kind
        if self.lo is None and self.hi is None:
            return self.kind
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{self.kind} in {left}{lo}, {hi}{right}"

    def check(self, value: Any, where: str) -> Any:
        """`value` converted to the declared kind, or a ConfigError naming `where`."""
        allowed = f"allowed: {self.describe_range()}"
        if isinstance(self.kind, tuple):
            if isinstance(value, bool) and self.bool_map is not None:
                value = self.bool_map[value]
            if value not in self.kind:
                raise ConfigError(f"{where}: `{self.name}: {value!r}` is not allowed; {allowed}")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: `{self.name}: {value!r}` must be true or false")
            return value
        if self.kind == "globs":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: `{self.name}` must be a list of tensor-name patterns, got {value!r}")
            return tuple(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: `{self.name}: {value!r}` must be a finite number; {allowed}")
        if self.kind == "int":
            if float(value) != int(value):
                raise ConfigError(f"{where}: `{self.name}: {value!r}` must be an integer; {allowed}")
            value = int(value)
        else:
            value = float(value)
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        too_high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if too_low or too_high:
            raise ConfigError(f"{where}: `{self.name}: {value!r}` is out of range; {allowed}")
        return value


@dataclass
class TensorContext:
    """What a method may know about the tensor besides its values.

    `stats` is filled by the method (ranks kept, outlier share, ...) and ends up in the merge report.
    `first_pass` is the result of the method's first pass over the whole model (None when it has none).
    `rng` is `distmerge: rng`; with "mergekit", `draw_state` is the state of torch's CPU generator where mergekit
    starts drawing for this tensor (None for a tensor that draws nothing).
    `transposed`: the tensor is a linear layer's weight stored [in, out] (GPT-2's Conv1D), not [out, in].
    `first_entry`: the method sees a row block of the tensor that starts at this flat entry (`blockwise` methods);
    the main random stream continues from there, so blocks draw what the whole tensor would.
    """

    name: str
    seed: int = 0
    model_ids: tuple[int, ...] = ()
    first_pass: Any = None
    stats: dict = field(default_factory=dict)
    transposed: bool = False
    rng: str = "distmerge"
    draw_state: bytes | None = None
    first_entry: int = 0  # where the tensor merged starts in the stored one (a row block's first entry)
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    @property
    def draws_as_mergekit(self) -> bool:
        return self.rng == "mergekit"

    def uniform(self, task: int, shape: torch.Size, device: torch.device, start: int = 0,
                stream: str = "") -> torch.Tensor:
        """Uniform [0, 1) draws for task `task`, keyed by (seed, tensor name, model index, stream): any worker,
        device or processing order gives the same numbers. `start` offsets into the flat element stream (row
        chunks); `stream` names an independent stream for another use (e.g. "svd" sketches).

        With `rng: mergekit` the main stream is mergekit's instead: torch.rand from this tensor's generator state,
        on the CPU, consumed in call order (a method asks for its tasks in model order, as mergekit draws them);
        `start` must then be 0."""
        if self.draws_as_mergekit and not stream:
            if self.draw_state is None or start:
                raise ValueError(f"{self.name}: mergekit's draws are one sequence per tensor, from the start")
            if self._generator is None:
                self._generator = generator_from_state(self.draw_state)
            return torch.rand(shape, generator=self._generator).to(device)
        name = f"{self.name}#{stream}" if stream else self.name
        return uniform(self.seed, name, self.model_ids[task], shape, device, self.first_entry + start)


@dataclass(frozen=True)
class Work:
    """What merging one tensor costs beyond reading its inputs: the decompositions it runs, and the scratch
    memory it needs, in elements of the compute dtype and of float64. `upper_bound`: the decompositions depend on
    the data (a rank found from the spectrum), and these are the most that can run."""

    decompositions: tuple[Decomposition, ...] = ()
    scratch: int = 0
    scratch_float64: int = 0
    upper_bound: bool = False


def entrywise(p: dict) -> bool:
    """`blockwise` for methods that combine the inputs entry by entry whatever their parameters."""
    return True


def elementwise_work(name: str, shape: tuple[int, ...], p: dict, n_tasks: int) -> Work:
    """No decompositions; two tensor-sized temporaries (masks, the elected sign)."""
    return Work(scratch=2 * math.prod(shape))


@dataclass(frozen=True)
class FirstPass:
    """A statistic of the whole model that a method needs before it merges any tensor.

    `statistic(base, models, p, ctx)` is computed per tensor (`ctx` names it, as for the merge) and summed over
    all merged tensors (integers, so that any split over workers gives the same sum); `finish(total, p)` turns the
    sum into the value every tensor's merge receives as `ctx.first_pass` (JSON-serialisable: a resumed merge
    reuses it). `wanted(p)` says from the
    resolved parameters whether this merge needs the pass; `check(ps)` vets the parameters of all merged tensors
    together (a message, or None), since one statistic serves them all.
    """

    label: str
    wanted: Callable[[dict], bool]
    check: Callable[[list[dict]], str | None]
    statistic: Callable[[torch.Tensor | None, torch.Tensor, dict, TensorContext], torch.Tensor]
    finish: Callable[[torch.Tensor, dict], Any]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    params: tuple[Param, ...]
    summary: str
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    reference: str = ""
    check: Callable[[dict], str | None] | None = None  # cross-parameter constraints; returns a message
    details: str = ""  # the exact formulas, where the summary cannot hold them
    work: Callable[[str, tuple[int, ...], dict, int], Work] = elementwise_work
    first_pass: FirstPass | None = None
    # how many uniforms mergekit 0.1.5 draws for a tensor of this shape with these parameters, for
    # `rng: mergekit`; None for a random method whose draws distmerge cannot reproduce (or that mergekit lacks)
    mergekit_draws: Callable[[tuple[int, ...], dict], int] | None = None
    # What `base_model` is, besides `needs_base` (required, the origin the models are measured from):
    # optional_base: the origin when given (a `models:` entry that is the base is skipped, as with needs_base); the
    #   method also runs on the models themselves without one (nuslerp, multislerp).
    # base_is_model: a given base_model is merged as one more model, after the listed ones unless it is listed
    #   itself: what mergekit does for methods that ignore the base (karcher, passthrough).
    optional_base: bool = False
    base_is_model: bool = False
    # Whether, with these parameters, each entry of the result depends only on the same entry of the inputs (and its
    # row, for DELLA's ranks): then a tensor may be merged in row blocks under a memory budget, with the same bytes.
    # None: never (a per-tensor statistic: TIES' top-k, a norm, ...).
    blockwise: Callable[[dict], bool] | None = None
    # Whether every NaN or infinity among the inputs reaches the result (weighted sums: NaN + x, inf - inf and
    # 0 * inf are all NaN). Then the inputs need no scan of their own: the merged tensor's scan finds a corrupt
    # input, which is then traced back to its model. Methods that select entries (masks, draws, where) lose them.
    non_finite_reaches_output: bool = False

    @property
    def takes_base(self) -> bool:
        """A given base_model is the origin, not one of the merged models."""
        return self.needs_base or self.optional_base

    def defaults(self, n_models: int, **overrides) -> dict:
        """Every parameter at its default (per-model ones as lists), with `overrides` applied as given."""
        params = {p.name: [p.default] * n_models if p.per_model else p.default for p in self.params}
        params.update(overrides)
        return params

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def names_with_aliases(self) -> dict[str, Param]:
        table = {p.name: p for p in self.params}
        table.update({p.alias: p for p in self.params if p.alias})
        return table


_REGISTRY: dict[str, MethodSpec] = {}


def merge_method(name: str, *, params: tuple[Param, ...], summary: str, needs_base: bool, min_models: int = 1,
                 max_models: int | None = None, random: bool = False, reference: str = "",
                 check: Callable[[dict], str | None] | None = None, details: str = "",
                 work: Callable[[str, tuple[int, ...], dict, int], Work] = elementwise_work,
                 first_pass: FirstPass | None = None,
                 mergekit_draws: Callable[[tuple[int, ...], dict], int] | None = None, optional_base: bool = False,
                 base_is_model: bool = False, blockwise: Callable[[dict], bool] | None = None,
                 non_finite_reaches_output: bool = False):
    def register(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        if needs_base + optional_base + base_is_model > 1:
            raise ValueError(f"merge method {name!r}: needs_base, optional_base and base_is_model exclude each other")
        _REGISTRY[name] = MethodSpec(name, fn, params, summary, needs_base, min_models, max_models, random,
                                     reference, check, details, work, first_pass, mergekit_draws, optional_base,
                                     base_is_model, blockwise, non_finite_reaches_output)
        return fn

    return register


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"`merge_method: {name}` is not a method; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> list[MethodSpec]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
