"""Sanity checks: does the map depend on the model? Both recompute maps with the run's method and settings.

- `randomization` (Adebayo et al. 2018, cascading model randomisation): the parameters are re-drawn layer by
  layer from the classifier down; after each stage the map is recomputed and compared with the clean one by
  Spearman rank correlation. A method that explains the model decorrelates (low is good); one that ignores
  it (an edge detector) stays at 1.
- `perturbation` (Rahman et al. 2022, GGIG's model-perturbation check): Gaussian noise of std t * std(W) is
  added to every parameter tensor W for t on a grid up to 100 %; the recomputed map's rank correlation with
  the clean map is set against the class probability. A trustworthy map degrades in step with the model's
  confidence: the per-image value is the mean gap between the two curves (low is good).

The model's parameters are always restored (in `finally`); buffers such as BatchNorm running statistics are
never touched. Every draw comes from a `torch.Generator` seeded from the run seed and the stage, so each
group of images sees the same randomised models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from saliency_cli.evaluate.base import _stable_hash, spearman

Recompute = Callable[[], torch.Tensor]  # maps (R, H, W) of the rows under the model as it is now


@dataclass(frozen=True)
class SanityCheck:
    """A sanity check's metadata. cost(options): map recomputations per image (each costs the method's own
    passes), plus `extra_forwards` forward passes per recomputation."""

    name: str
    summary: str
    paper: str
    higher_is_better: bool
    defaults: dict[str, Any]
    cost: Callable[[dict[str, Any]], int]
    extra_forwards: int = 0


SANITY: dict[str, SanityCheck] = {
    "randomization": SanityCheck(
        "randomization", "Spearman correlation of the map with the map of the fully re-drawn model (cascading)",
        "Adebayo et al. 2018, Sanity Checks for Saliency Maps, arXiv:1810.03292", False,
        {"max_stages": 12}, lambda o: o["max_stages"] + 1),
    "perturbation": SanityCheck(
        "perturbation", "Gap between map similarity and retained class probability under growing weight noise",
        "Rahman et al. 2022, GGIG (model-perturbation check)", False,
        {"grid": (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)}, lambda o: len(o["grid"]) + 1, 1),
}


@contextlib.contextmanager
def parameters_restored(model: torch.nn.Module) -> Iterator[list[tuple[torch.nn.Parameter, torch.Tensor]]]:
    """Yields (parameter, clean copy) pairs; every parameter gets its clean value back on exit."""
    pairs = [(p, p.detach().clone()) for p in model.parameters()]
    try:
        yield pairs
    finally:
        with torch.no_grad():
            for p, p0 in pairs:
                p.copy_(p0)


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


def _generator(device: torch.device, seed: int, purpose: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + _stable_hash(purpose)) & ((1 << 63) - 1))


def _redraw(p: torch.nn.Parameter, generator: torch.Generator) -> None:
    """p <- N(mean(p), std(p)^2) elementwise: a re-initialisation that keeps the tensor's scale, so the
    activations of the re-drawn network neither explode nor vanish (model-agnostic; no layer-type table)."""
    mean, std = p.detach().float().mean(), p.detach().float().std(unbiased=False)
    draw = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
    p.copy_((mean + std * draw).to(p.dtype))


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


def randomization(model: torch.nn.Module, recompute: Recompute, *, seed: int = 0, max_stages: int = 12
                  ) -> RandomizationResult:
    """Cascading randomisation from the classifier down (Adebayo 2018): after each stage, the Spearman rank
    correlation of the recomputed maps with the clean ones. Cost: (stages + 1) map recomputations."""
    clean = recompute()
    stages = cascade_stages(layer_units(model), max_stages)
    device = clean.device
    out = []
    with parameters_restored(model):
        generator = _generator(next(model.parameters()).device, seed, "randomization")
        for _, params in stages:
            with torch.no_grad():
                for p in params:
                    _redraw(p, generator)
            maps = recompute()
            out.append(spearman(maps, clean).to(device))
    return RandomizationResult([name for name, _ in stages], torch.stack(out))


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


def perturbation(model: torch.nn.Module, recompute: Recompute, probability: Callable[[], torch.Tensor], *,
                 seed: int = 0, grid: tuple[float, ...] | list[float] = SANITY["perturbation"].defaults["grid"]
                 ) -> PerturbationResult:
    """GGIG's model-perturbation check: for each t in grid, W <- W0 + t * std(W0) * N(0, 1) for every parameter
    tensor (one generator per level; levels do not compound), then the maps and the target probabilities.
    Cost: len(grid) + 1 map recomputations and as many forward passes."""
    clean = recompute()
    sims = [torch.ones(clean.shape[0], device=clean.device)]
    probs = [probability()]
    with parameters_restored(model) as pairs:
        device = pairs[0][0].device if pairs else clean.device
        for i, t in enumerate(grid):
            generator = _generator(device, seed, f"perturbation:{i}")
            with torch.no_grad():
                for p, p0 in pairs:
                    std = p0.float().std(unbiased=False)
                    draw = torch.randn(p0.shape, generator=generator, device=p0.device, dtype=torch.float32)
                    p.copy_((p0.float() + float(t) * std * draw).to(p.dtype))
            maps = recompute()
            sims.append(spearman(maps, clean).to(clean.device))
            probs.append(probability().to(clean.device))
    return PerturbationResult([0.0, *[float(t) for t in grid]], torch.stack(sims), torch.stack(probs))
