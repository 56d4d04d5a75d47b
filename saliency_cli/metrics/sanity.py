"""Sanity checks: does the map depend on the model? Both recompute maps with the run's method and settings.

- `randomization` (Adebayo et al. 2018, cascading model-parameter randomisation, as Quantus's MPRT does it):
  from the logits down, each layer (each module with its own `reset_parameters()`: convolutions, linear
  layers, normalisation layers) is re-initialised with its own initialiser, BatchNorm running statistics
  included (`reset_running_stats()`), cumulatively; after each layer the map is recomputed and compared with
  the clean one by Spearman rank correlation. A method that explains the model decorrelates (low is good); one
  that ignores it (an edge detector) stays at 1.
- `perturbation` (Rahman et al. 2022, GGIG's model-perturbation check): Gaussian noise of std t * std(W) is
  added to every parameter tensor W for t on a grid up to 100 %; the recomputed map's rank correlation with
  the clean map is set against the class probability. A trustworthy map degrades in step with the model's
  confidence: the per-image value is the mean gap between the two curves (low is good).

A check is registered like a metric (`@register_check`), with its metadata and its function

    fn(oracle, recompute, probability, *, seed, **options) -> SanityResult

and `evaluate` dispatches through `SANITY_CHECKS`. The model is only written through
`GradientOracle.parameters_edited()` (its `reset_layer` for the randomisation), which always restores the
parameters and every buffer it touched. Every draw is seeded from the run seed and the stage or layer
(`numerics.purpose_seed`, `numerics.derive_seed`), so each group of images sees the same randomised models. A
model without parameters (e.g. a frozen TorchScript module) cannot be checked: a SaliencyError says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from saliency_cli.errors import SaliencyError
from saliency_cli.numerics import derive_seed, purpose_seed, seeded_generator, spearman
from saliency_cli.oracle import GradientOracle

Recompute = Callable[[], torch.Tensor]  # maps (R, H, W) of the rows under the model as it is now
Probability = Callable[[], torch.Tensor]  # probability (R,) of the rows' targets under the model as it is now


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


def reinit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers the cascade re-initialises, in the model's registration order (input to output for the usual
    sequential layout): every module with a callable `reset_parameters()` and a parameter or buffer of its own
    (Quantus's MPRT takes every module with `reset_parameters`; a container without tensors of its own adds
    nothing). Parameters of modules without `reset_parameters` (e.g. a class token) are not re-initialised.
    Names are the modules' qualified names (`blocks.6.0.conv_pwl`); the model itself is `model`."""
    out = []
    for name, m in model.named_modules():
        own = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
        if own and callable(getattr(m, "reset_parameters", None)):
            out.append((name or "model", m))
    return out


def cascade_stages(units: list[tuple[str, list[Any]]], max_stages: int) -> list[tuple[str, list[Any]]]:
    """Units from the output down, merged into at most `max_stages` groups of consecutive units (the top unit
    alone when there is room, the rest split as evenly as possible; `max_stages` 0: one group per unit). Stage
    k re-initialises groups 0..k."""
    top_down = list(reversed(units))
    if max_stages <= 0 or len(top_down) <= max_stages:
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


def layer_seed(seed: int, layer: str) -> int:
    """The seed of one layer's re-initialisation: a function of the run seed and the layer's name only, so a
    layer gets the same random weights whatever the stages, the images or the method."""
    return derive_seed("randomization", seed, layer)


@dataclass
class RandomizationResult:
    """stages: the layers re-initialised at each stage (top first; stage k includes 0..k; `a..b` for a merged
    group); correlations (K, R): Spearman of each row's map with its clean map after stage k; value (R,): the
    last stage's correlation (every layer re-initialised)."""

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
                summary="Spearman correlation of the map with the map of the model re-initialised layer by layer "
                        "from the logits down (cascading MPRT; one map per layer, a model-dependent count, or "
                        "max_stages)",
                paper="Adebayo et al. 2018, Sanity Checks for Saliency Maps, arXiv:1810.03292",
                higher_is_better=False, defaults={"max_stages": 0},
                cost=lambda o: o["max_stages"] + 1 if o["max_stages"] > 0 else 0,
                layout=lambda means: dict(means["correlations"]))
def randomization(oracle: GradientOracle, recompute: Recompute, probability: Probability | None = None, *,
                  seed: int = 0, max_stages: int = 0) -> RandomizationResult:
    """Cascading model-parameter randomisation (Adebayo 2018; Quantus's MPRT, `layer_order` top-down): for
    each layer of `reinit_layers` from the output down, `reset_parameters()` (and `reset_running_stats()`)
    under torch's global generator seeded with `layer_seed(seed, layer name)`, cumulatively, then the Spearman
    rank correlation of the recomputed maps with the clean ones. max_stages 0 (default): a point after every
    layer, the per-layer curve; k > 0: after each of k groups of consecutive layers (the same re-initialised
    weights, fewer recomputations). Cost: (stages + 1) map recomputations. probability: not used (the cascade
    compares maps only; every check takes the same arguments). Parameters and buffers are restored after."""
    _require_parameters(oracle, "randomization")
    layers = reinit_layers(oracle.model)
    if not layers:
        raise SaliencyError("--sanity randomization: no layer of the model has reset_parameters()")
    clean = recompute()
    stages = cascade_stages([(name, [(name, m)]) for name, m in layers], max_stages)
    out = []
    with oracle.parameters_edited() as editor:
        for _, members in stages:
            for name, module in members:
                editor.reset_layer(module, layer_seed(seed, name))
            out.append(spearman(recompute(), clean).to(clean.device))
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
            device = editor.device or clean.device  # parameters exist: _require_parameters checked it
            editor.add_scaled_noise(seeded_generator(purpose_seed(seed, f"perturbation:{i}"), device), t)
            maps = recompute()
            sims.append(spearman(maps, clean).to(clean.device))
            probs.append(probability().to(clean.device))
    return PerturbationResult([0.0, *[float(t) for t in grid]], torch.stack(sims), torch.stack(probs))
