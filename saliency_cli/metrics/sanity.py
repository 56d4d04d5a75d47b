"""Sanity checks: does the map depend on the model? Both recompute maps with the run's method and settings.

- `randomization` (Adebayo et al. 2018, cascading model randomisation): the parameters are re-drawn layer by
  layer from the classifier down; after each stage the map is recomputed and compared with the clean one by
  Spearman rank correlation. A method that explains the model decorrelates (low is good); one that ignores
  it (an edge detector) stays at 1.
- `perturbation` (Rahman et al. 2022, GGIG's model-perturbation check): Gaussian noise of std t * std(W) is
  added to every parameter tensor W for t on a grid up to 100 %; the recomputed map's rank correlation with
  the clean map is set against the class probability. A trustworthy map degrades in step with the model's
  confidence: the per-image value is the mean gap between the two curves (low is good).

A check is registered like a metric (`@register_check`), with its metadata and its function

    fn(oracle, recompute, probability, *, seed, **options) -> SanityResult

and `evaluate` dispatches through `SANITY_CHECKS`. The parameters are only written through
`GradientOracle.parameters_edited()`, which always restores them; buffers such as BatchNorm running statistics
are never touched. Every draw comes from a `torch.Generator` seeded from the run seed and the stage
(`numerics.purpose_seed`), so each group of images sees the same randomised models. A model without
parameters (e.g. a frozen TorchScript module) cannot be checked: a SaliencyError says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from saliency_cli.errors import SaliencyError
from saliency_cli.numerics import purpose_seed, seeded_generator, spearman
from saliency_cli.oracle import GradientOracle

Recompute = Callable[[], torch.Tensor]  # maps (R, H, W) of the rows under the model as it is now
Probability = Callable[[], torch.Tensor]  # softmax probability (R,) of the rows' targets under the model as it is now


class SanityResult(Protocol):
    """What a check returns for R rows: value (R,) one number per row; `shared`, what is the same for every row
    (stage names, noise levels); `curves`, name -> (K, R) one curve per row (in evaluation.json per image)."""

    value: torch.Tensor

    @property
    def shared(self) -> dict[str, Any]: ...

    @property
    def curves(self) -> dict[str, torch.Tensor]: ...


SanityFn = Callable[..., SanityResult]
# layout(mean curves by curve name) -> how a method's mean curves appear in evaluation.json
CurveLayout = Callable[[dict[str, dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class SanityCheck:
    """A registered sanity check and its metadata. cost(options): map recomputations per image (each costs the
    method's own passes), plus `extra_forwards` forward passes per recomputation. layout: how the mean curves
    of a method appear in evaluation.json."""

    name: str
    fn: SanityFn
    summary: str
    paper: str
    higher_is_better: bool
    defaults: dict[str, Any]
    cost: Callable[[dict[str, Any]], int]
    extra_forwards: int = 0
    layout: CurveLayout = dict


SANITY_CHECKS: dict[str, SanityCheck] = {}


def register_check(name: str, *, summary: str, paper: str, higher_is_better: bool, defaults: dict[str, Any],
                   cost: Callable[[dict[str, Any]], int], extra_forwards: int = 0,
                   layout: CurveLayout = dict) -> Callable[[SanityFn], SanityFn]:
    """Register a sanity check under its CLI name (the `--sanity` value)."""

    def wrap(fn: SanityFn) -> SanityFn:
        if name in SANITY_CHECKS:
            raise ValueError(f"sanity check {name!r} registered twice")
        SANITY_CHECKS[name] = SanityCheck(name, fn, summary, paper, higher_is_better, dict(defaults), cost,
                                          extra_forwards, layout)
        return fn

    return wrap


def _require_parameters(oracle: GradientOracle, check: str) -> None:
    if oracle.parameter_device() is None:
        raise SaliencyError(f"--sanity {check}: the model exposes no parameters to perturb (e.g. a frozen "
                            "TorchScript module); run the check on a model whose weights can be edited")


def layer_units(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """The model's layers in input-to-output order, as (name, parameters): its top-level children, with a
    Sequential or ModuleList child opened one level (timm's `blocks` -> its stages). Children without
    parameters are dropped; a model without children is one unit."""
    units: list[tuple[str, list[torch.nn.Parameter]]] = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Sequential | torch.nn.ModuleList) or type(child).__name__ in (
                "Sequential", "ModuleList"):
            parts = [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            parts = [(name, child)]
        for n, c in parts:
            params = list(c.parameters())
            if params:
                units.append((n, params))
    covered = {id(p) for _, ps in units for p in ps}
    rest = [p for p in model.parameters() if id(p) not in covered]
    if not units:
        return [("model", rest)] if rest else []
    if rest:  # parameters held by the model itself (e.g. a class token) go with the first layer
        units[0] = (units[0][0], rest + units[0][1])
    return units


def cascade_stages(units: list[tuple[str, list[torch.nn.Parameter]]], max_stages: int
                   ) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Units from the output down, merged into at most `max_stages` groups of consecutive units (the top unit
    alone when there is room, the rest split as evenly as possible). Stage k re-draws groups 0..k."""
    top_down = list(reversed(units))
    if len(top_down) <= max_stages:
        return top_down
    head, rest, k = ([top_down[0]], top_down[1:], max_stages - 1) if max_stages >= 2 else ([], top_down, 1)
    size, extra = divmod(len(rest), k)
    groups = list(head)
    start = 0
    for i in range(k):
        stop = start + size + (1 if i < extra else 0)
        chunk = rest[start:stop]
        name = chunk[0][0] if len(chunk) == 1 else f"{chunk[0][0]}..{chunk[-1][0]}"
        groups.append((name, [p for _, ps in chunk for p in ps]))
        start = stop
    return groups


@dataclass
class RandomizationResult:
    """stages: the names of the groups re-drawn at each stage (top first; stage k includes 0..k);
    correlations (K, R): Spearman of each row's map with its clean map after stage k; value (R,): the last
    stage's correlation (everything re-drawn)."""

    stages: list[str]
    correlations: torch.Tensor
    value: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.value = self.correlations[-1]

    @property
    def shared(self) -> dict[str, Any]:
        return {"stages": self.stages}

    @property
    def curves(self) -> dict[str, torch.Tensor]:
        return {"correlations": self.correlations}


@register_check("randomization",
                summary="Spearman correlation of the map with the map of the fully re-drawn model (cascading)",
                paper="Adebayo et al. 2018, Sanity Checks for Saliency Maps, arXiv:1810.03292",
                higher_is_better=False, defaults={"max_stages": 12}, cost=lambda o: o["max_stages"] + 1,
                layout=lambda means: dict(means["correlations"]))
def randomization(oracle: GradientOracle, recompute: Recompute, probability: Probability | None = None, *,
                  seed: int = 0, max_stages: int = 12) -> RandomizationResult:
    """Cascading randomisation from the classifier down (Adebayo 2018): after each stage, the Spearman rank
    correlation of the recomputed maps with the clean ones. Cost: (stages + 1) map recomputations.
    probability: not used (the cascade compares maps only; every check takes the same arguments)."""
    _require_parameters(oracle, "randomization")
    clean = recompute()
    stages = cascade_stages(layer_units(oracle.model), max_stages)
    device = clean.device
    out = []
    with oracle.parameters_edited() as editor:
        generator = seeded_generator(purpose_seed(seed, "randomization"), editor.device)
        for _, params in stages:
            editor.redraw(params, generator)
            maps = recompute()
            out.append(spearman(maps, clean).to(device))
    return RandomizationResult([name for name, _ in stages], torch.stack(out))


PERTURBATION_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


@dataclass
class PerturbationResult:
    """t (T+1,) noise levels, 0 first; similarity (T+1, R): Spearman of the map with the clean map (1 at
    t = 0); probability (T+1, R): softmax probability of the row's target; value (R,): the tracking gap
    mean_{t > 0} |similarity(t) - min(1, p(t) / p(0))|, how far the map's change is from the change of the
    model's confidence (0: in step; an edge detector, whose map never changes, scores the confidence lost)."""

    t: list[float]
    similarity: torch.Tensor
    probability: torch.Tensor
    value: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        retained = (self.probability[1:] / self.probability[:1].clamp(min=1e-12)).clamp(max=1.0)  # (T, R)
        self.value = (self.similarity[1:] - retained).abs().mean(0)

    @property
    def shared(self) -> dict[str, Any]:
        return {"t": self.t}

    @property
    def curves(self) -> dict[str, torch.Tensor]:
        return {"similarity": self.similarity, "probability": self.probability}


@register_check("perturbation",
                summary="Gap between map similarity and retained class probability under growing weight noise",
                paper="Rahman et al. 2022, GGIG (model-perturbation check)", higher_is_better=False,
                defaults={"grid": PERTURBATION_GRID}, cost=lambda o: len(o["grid"]) + 1, extra_forwards=1)
def perturbation(oracle: GradientOracle, recompute: Recompute, probability: Probability, *, seed: int = 0,
                 grid: tuple[float, ...] | list[float] = PERTURBATION_GRID) -> PerturbationResult:
    """GGIG's model-perturbation check: for each t in grid, W <- W0 + t * std(W0) * N(0, 1) for every parameter
    tensor (one generator per level; levels do not compound), then the maps and the target probabilities.
    Cost: len(grid) + 1 map recomputations and as many forward passes."""
    _require_parameters(oracle, "perturbation")
    clean = recompute()
    sims = [torch.ones(clean.shape[0], device=clean.device)]
    probs = [probability()]
    with oracle.parameters_edited() as editor:
        for i, t in enumerate(grid):
            editor.add_scaled_noise(seeded_generator(purpose_seed(seed, f"perturbation:{i}"), editor.device), t)
            maps = recompute()
            sims.append(spearman(maps, clean).to(clean.device))
            probs.append(probability().to(clean.device))
    return PerturbationResult([0.0, *[float(t) for t in grid]], torch.stack(sims), torch.stack(probs))
