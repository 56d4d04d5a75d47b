"""NoiseGrad and FusionGrad: noise on the model's weights (Bykov, Hedström, Nakajima, Höhne; AAAI 2022).

A noisy model multiplies every parameter (conv/linear weights and biases, BatchNorm gamma and beta, the
classifier) elementwise by an independent draw `eta ~ N(1, s^2)`; buffers such as BatchNorm running statistics
stay untouched. `oracle.parameters_edited()` does this in place from one clean copy of the parameters and
writes the clean values back in `finally`: no deep copy, no `load_state_dict` per draw.

Noisy model m draws its `eta` from a generator seeded from (run seed, m) only, so every image of a run, in
whatever batch, is explained with the same M noisy models; the input noise of fusiongrad comes from each
image's own generator.

Two displays. The reference code calls its explanation function once per noisy model (FusionGrad: per noisy
model and noisy input), and that function returns `sum_c |A_c|` (Captum's `Saliency(abs=True)` or
`|IG|`, summed over channels); the map shown is the mean of those. Ours returns both:

- the raw signed mean `mean_m A_m` (maps; `--reduce sum` its signed channel sum, `--reduce none` all channels,
  `--reduce abs-sum` sum_c |mean_m A_m,c|, abs *after* averaging, this tool's display before this change);
- the reference's display `mean_m sum_c |A_m,c|` (Attribution.display, abs *before* averaging), picked by the
  reduction `mean-abs-sum`, the default of both methods.

On the bundled model and the six sample images (s auto = 0.007) noisegrad's two displays, `abs-sum` of the
mean and the reference's, agree to Pearson r 0.89-0.98, the first being 17-39 % smaller in total (signed
gradients of different models partly cancel in the mean; in the reference's they cannot); for fusiongrad
(10 x 10) r is only 0.62-0.80 and the first 79-85 % smaller, since averaging over input noise cancels most of
the signed gradient before the abs.

`--base` averages another attribution than the gradient (methods/base_attribution.py): fusiongrad over
integrated-gradients is NoiseGrad++ over IG as the paper evaluates it. `--models auto` adds noisy models two at
a time (one to each half) until the split-half correlation reaches `--converge` (methods/convergence.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from saliency_cli.methods.base import (
    Attribution,
    MethodContext,
    NoisyPoints,
    SampleStats,
    gaussian,
    noise_sigma,
    noise_stats,
    register,
    sample_result,
)
from saliency_cli.methods.base_attribution import (
    Base,
    base_cost,
    base_width,
    check_base_options,
    prepare_base,
    stream_base,
)
from saliency_cli.methods.convergence import MODEL_ROUND, Convergence, mean_of
from saliency_cli.numerics import derive_seed, seeded_generator
from saliency_cli.oracle import GradientOracle

PAPER = "Bykov, Hedström, Nakajima, Höhne 2022, AAAI, arXiv:2106.10185"

# The reference's FusionGrad input noise is 0.4 absolute in normalised units. For ImageNet-normalised images the
# range max(x) - min(x) is about 4.7 (at most 4.758 = 2.640 - (-2.118); 4.5 to 4.76 on the sample images), so the
# relative equivalent is 0.4 / 4.7 = 0.085.
FUSION_NOISE = 0.085


def weight_generator(seed: int, m: int, device: torch.device | str) -> torch.Generator:
    """The generator of noisy model m, on the parameters' device: a function of (run seed, m) only."""
    return seeded_generator(derive_seed("weight-noise", seed, m), device)


def check_weight_noise(value: Any) -> float | str:
    """`s` as a float >= 0, or `auto` (calibrated on each image itself: `_per_image`)."""
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        raise ValueError(f"weight_noise {value!r}: expected a number or 'auto'")
    s = float(value)
    if not s >= 0:
        raise ValueError(f"weight_noise {s}: must be zero or positive")
    return s


# The reference's s = 0.2 is not a safe default: on the bundled EfficientNet-Lite0 the noisy models agree with the
# clean model's top-1 on 0 % of the sample images at s = 0.2 (35 % at 0.05), so the map would average gradients
# of broken models. The paper's own rule (noisy models lose about 5 % of top-1 agreement) gives s = 0.007 there;
# `auto` applies that rule to whatever model is loaded.
WEIGHT_NOISE_DEFAULT = "auto"


def _parameter_device(oracle: GradientOracle, s: float) -> torch.device:
    """Where the weight noise is drawn. A model without parameters (e.g. a frozen TorchScript module, whose
    weights became constants) cannot be perturbed: refuse rather than silently return the plain gradient."""
    device = oracle.parameter_device()
    if device is not None:
        return device
    if s > 0:
        raise ValueError("the model exposes no parameters (a frozen TorchScript module?): weight noise cannot be "
                         "applied")
    return torch.device("cpu")


def model_count(hyper: dict[str, Any]) -> int:
    """Noisy models per image: `models`, or its cap `max_samples` when it is `auto`."""
    return int(hyper["max_samples"] if hyper["models"] == "auto" else hyper["models"])


def calibration_cost(hyper: dict[str, Any]) -> int:
    """Forward passes per image of `weight_noise` auto (`calibrate_weight_noise` at its defaults), else 0."""
    return CALIBRATION_PASSES if hyper.get("weight_noise") == "auto" else 0


NOISEGRAD_DEFAULTS = {"weight_noise": WEIGHT_NOISE_DEFAULT, "models": 10, "base": "gradient", "converge": 0.95,
                      "max_samples": 50}
FUSION_DEFAULTS = {"weight_noise": WEIGHT_NOISE_DEFAULT, "models": 10, "noise": FUSION_NOISE, "samples": 10,
                   "noise_unit": "relative", "base": "gradient", "converge": 0.95, "max_samples": 50}


@register("noisegrad", summary="Mean gradient (or --base attribution) over M models with N(1, s^2) weight noise",
          paper=PAPER, defaults=NOISEGRAD_DEFAULTS, stochastic=True,
          cost=lambda h: model_count(h) * base_cost(h) + calibration_cost(h), reduce="mean-abs-sum",
          width=lambda h: base_width(str(h.get("base", "gradient")), h))
def noisegrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
              generators: list[torch.Generator], ctx: MethodContext, weight_noise: float | str,
              models: int | str, base: str = "gradient", converge: float = 0.95, max_samples: int = 50,
              **base_options: Any) -> Attribution:
    """mean_m A_m(x), where A_m is the base attribution (default the gradient g_m) of the target score under
    weights `theta * eta_m`, `eta_m ~ N(1, s^2)` elementwise, s = weight_noise. (B, C, H, W), signed; display
    (B, H, W): the reference's `mean_m sum_c |A_m,c|` (module docstring).

    Cost: M base passes per image (M gradient passes by default), plus one weight draw per model, shared by all
    images of the batch (for the bundled model's 4.65 M parameters about 13 ms per draw on 2 idle CPU cores,
    against about 150 ms for one image's gradient pass).
    stats: weight_noise (B,), the s used; dropped_samples, noisy models whose map was not finite; with
    models = auto, models_used and split_half.
    """
    check_base_options(base, base_options)
    s = check_weight_noise(weight_noise)

    def explain(x: torch.Tensor, target: torch.Tensor, gens: list[torch.Generator], s: float) -> Attribution:
        prepared = prepare_base(base, x, gens, ctx, base_options)
        return _over_models(oracle, x, target, gens, ctx, prepared, s, models, None, converge, max_samples)

    return _per_image(oracle, x, target, generators, ctx, s, explain)


@register("fusiongrad", summary="SmoothGrad on each of M weight-noised models (NoiseGrad x SmoothGrad)",
          paper=PAPER, defaults=FUSION_DEFAULTS, stochastic=True,
          cost=lambda h: model_count(h) * int(h["samples"]) * base_cost(h) + calibration_cost(h),
          reduce="mean-abs-sum", width=lambda h: int(h["samples"]) * base_width(str(h.get("base", "gradient")), h),
          cheap={"models": 5, "samples": 5})
def fusiongrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
               generators: list[torch.Generator], ctx: MethodContext, weight_noise: float | str, models: int | str,
               noise: float, samples: int, noise_unit: str = "relative", base: str = "gradient",
               converge: float = 0.95, max_samples: int = 50, **base_options: Any) -> Attribution:
    """mean_m mean_n A_m(x + e_mn), e_mn ~ N(0, sigma^2), and A_m the base attribution (default the gradient)
    under weights `theta * eta_m`, `eta_m ~ N(1, s^2)`. (B, C, H, W), signed; display (B, H, W): the reference's
    `mean_mn sum_c |A_m,c(x + e_mn)|` (module docstring).

    noise is relative by default: 0.085 is the reference's 0.4 absolute in ImageNet-normalised units divided by
    a typical image range of about 4.7 (3.78 on the cat, where 0.085 is 0.32 absolute); `--noise 0.4
    --noise-unit absolute` is the reference's setting exactly. All M*N input draws of an image are taken from
    its generator at once, so the map does not depend on chunking; the N inputs of a noisy model go through it
    as one batch. `-n auto` is not offered: the Monte Carlo rounds run over noisy models (`--models auto`, each
    with its N input samples, the same draws as a fixed `--models M` run's first M models on the CPU).
    stats: sigma, noise_absolute, noise_relative (B,), the input noise; weight_noise (B,); dropped_samples;
    with models = auto, models_used and split_half.
    """
    if samples == "auto":
        raise ValueError("fusiongrad: -n auto is not offered; use --models auto (rounds of noisy models)")
    check_base_options(base, base_options)
    s = check_weight_noise(weight_noise)

    def explain(x: torch.Tensor, target: torch.Tensor, gens: list[torch.Generator], s: float) -> Attribution:
        prepared = prepare_base(base, x, gens, ctx, base_options)  # the baseline first, then the noise
        sigma = noise_sigma(x, float(noise), noise_unit)  # (B,)
        result = _over_models(oracle, x, target, gens, ctx, prepared, s, models, (int(samples), sigma), converge,
                              max_samples)
        result.stats.update(noise_stats(x, sigma))
        return result

    return _per_image(oracle, x, target, generators, ctx, s, explain)


def _per_image(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, generators: list[torch.Generator],
               ctx: MethodContext, s: float | str,
               explain: Callable[[torch.Tensor, torch.Tensor, list[torch.Generator], float], Attribution]
               ) -> Attribution:
    """explain(x, target, generators, s) on the whole batch for a given s; for `auto`, image by image, each at
    the s calibrated on that image alone (with the run seed's noisy models), so that an image's map never
    depends on the other images of the run, its batch or its order (s is a function of the image and the run
    seed, found once for consecutive copies of an image). stats: weight_noise (B,), the s used."""
    if s != "auto":
        return explain(x, target, generators, float(s))
    parts, s_i = [], 0.0
    for i in range(x.shape[0]):
        if i == 0 or not torch.equal(x[i], x[i - 1]):  # a row that repeats the last (top-k, a group's filler): its s
            s_i = calibrate_weight_noise(oracle, x[i:i + 1], seed=ctx.seed)
        parts.append(explain(x[i:i + 1], target[i:i + 1], generators[i:i + 1], s_i))
    display = None
    if all(p.display is not None for p in parts):
        display = torch.cat([p.display for p in parts])  # type: ignore[misc]
    stats = {k: torch.cat([p.stats[k] for p in parts]) for k in parts[0].stats}
    return Attribution(torch.cat([p.maps for p in parts]), stats, display)


def _over_models(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, generators: list[torch.Generator],
                 ctx: MethodContext, base: Base, s: float, models: int | str,
                 inputs: tuple[int, torch.Tensor] | None, converge: float, cap: int) -> Attribution:
    """The mean over noisy models of the base attribution at x (inputs None: NoiseGrad) or at N noisy inputs
    x + sigma * N(0, 1) per model (inputs = (N, sigma (B,)): FusionGrad), with the reference's display."""
    device = _parameter_device(oracle, s)
    b = x.shape[0]
    s_used = torch.full((b,), s, dtype=torch.float64, device=x.device)
    if models == "auto":
        return _models_until_converged(oracle, x, target, generators, ctx, base, s, device, inputs, float(converge),
                                       int(cap))
    n_models = int(models)
    noisy = None
    if inputs is not None:  # the M*N input draws of an image in order, model after model, whatever the chunks
        n, sigma = inputs
        noisy = NoisyPoints(x, generators, n_models * n, sigma.view(-1, 1, 1, 1, 1))  # (B, M*N, C, H, W)
    stats, shown = SampleStats(), SampleStats()

    def consume(a: torch.Tensor, sl: slice) -> None:
        stats.update(a)
        shown.update(a.abs().sum(2))  # (B, k, C, H, W) -> (B, k, H, W): each explanation's sum_c |A_c|

    with oracle.parameters_edited() as editor:
        for m in range(n_models):  # one noisy model at a time: all images of the batch go through it at once
            editor.scale_by_noise(weight_generator(ctx.seed, m, device), s)
            points = x[:, None] if noisy is None else noisy.window(m * n, n)  # (B, N, C, H, W) of model m
            stream_base(oracle, points, target, base, consume)
    assert stats.mean is not None and shown.mean is not None
    result = sample_result(stats, stats.mean, weight_noise=s_used)
    result.display = torch.where(torch.isnan(result.maps[:, 0]), float("nan"), shown.mean)
    return result


def _models_until_converged(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor,
                            generators: list[torch.Generator], ctx: MethodContext, base: Base, s: float,
                            device: torch.device, inputs: tuple[int, torch.Tensor] | None, converge: float,
                            cap: int) -> Attribution:
    """`--models auto`: noisy models m = 0, 1, ... (the same as a fixed run's), model m's explanations to half
    m mod 2; after every MODEL_ROUND models each unfinished image checks its split-half correlation and stops at
    `converge` or `cap` models. Stopped images skip the later models."""
    if not 0 < converge < 1:
        raise ValueError(f"converge {converge}: must be between 0 and 1")
    b = x.shape[0]
    acc = Convergence(b, display=True)
    active, m = list(range(b)), 0
    with oracle.parameters_edited() as editor:
        while active:
            rows = torch.tensor(active, device=x.device)
            editor.scale_by_noise(weight_generator(ctx.seed, m, device), s)
            points = x[rows][:, None]  # (A, 1, C, H, W)
            if inputs is not None:
                n, sigma = inputs
                eps = gaussian([generators[i] for i in active], n, x[rows]) * sigma[rows].view(-1, 1, 1, 1, 1)
                points = points + eps  # (A, N, C, H, W)
            half = torch.full((points.shape[1],), m % 2 == 1, device=x.device)

            def consume(a: torch.Tensor, sl: slice, active: list[int] = active, half: torch.Tensor = half) -> None:
                acc.update(active, a, half[sl])

            stream_base(oracle, points, target[rows], base, consume, rows)
            m += 1
            if m % MODEL_ROUND == 0 or m >= cap:
                active = acc.check(active, m, mean_of, converge, cap)
    result = acc.result(mean_of, x.device,
                        weight_noise=torch.full((b,), s, dtype=torch.float64, device=x.device))
    result.stats["models_used"] = result.stats.pop("samples_used")
    return result


# -- choosing s -----------------------------------------------------------------------------------------
def weight_noise_agreement(oracle: GradientOracle, x: torch.Tensor, weight_noise: float, *, seed: int, models: int,
                           clean: torch.Tensor | None = None) -> float:
    """Share of (noisy model, image) pairs whose top-1 class equals the clean model's top-1 on x (N, C, H, W).

    The noisy models are the ones noisegrad uses with this seed (model m from `weight_generator(seed, m)`), so
    for a fixed seed the agreement is a function of s alone (common random numbers). clean: the clean model's
    top-1 classes (N,), computed when not given.
    """
    s = float(weight_noise)
    device = _parameter_device(oracle, s)
    if clean is None:
        clean = oracle.logits(x).argmax(1)
    agree = torch.zeros((), dtype=torch.int64, device=x.device)  # counted on the device: one sync, at the end
    with oracle.parameters_edited() as editor:
        for m in range(int(models)):
            editor.scale_by_noise(weight_generator(seed, m, device), s)
            agree += (oracle.logits(x).argmax(1) == clean).sum()
    return int(agree) / (int(models) * x.shape[0])


def bisection_steps(tol: float = 0.05, floor: float = 1e-6, limit: float = 4.0) -> int:
    """Geometric bisection steps that shrink [floor, limit] to hi / lo <= 1 + tol."""
    return max(0, math.ceil(math.log2(math.log(limit / floor) / math.log1p(tol))))


CALIBRATION_MODELS = 10
# Forward passes per image of `auto` at the defaults: the clean pass, then 10 noisy models at each of 9 steps.
CALIBRATION_PASSES = 1 + bisection_steps() * CALIBRATION_MODELS


def calibrate_weight_noise(oracle: GradientOracle, x: torch.Tensor, *, seed: int, drop: float = 0.05,
                           models: int = CALIBRATION_MODELS, tol: float = 0.05, floor: float = 1e-6,
                           limit: float = 4.0) -> float:
    """The weight noise s at which the noisy models keep about `1 - drop` top-1 agreement with the clean model
    on the images x (N, C, H, W): the paper's heuristic (about 5 % relative loss of agreement, drop = 0.05).
    `auto` calls it on each image alone (N = 1: s is the largest noise at which all 10 noisy models keep the
    image's top-1 class, to within tol).

    Geometric bisection on s in [floor, limit] with the invariant agreement(lo) >= 1 - drop > agreement(hi)
    (models differ by orders of magnitude: s = 0.2 keeps no agreement at all on the bundled efficientnet_lite0,
    whose s is about 0.007), a fixed number of steps (`bisection_steps`) until hi / lo <= 1 + tol; the geometric
    midpoint is returned. A model that keeps the agreement up to `limit` gives about `limit`, one that loses it
    even at `floor` about `floor`.

    Deterministic given the seed: every evaluation uses the same M noisy draws (see `weight_noise_agreement`).
    Cost, fixed: 1 + steps * models forward passes per image (no backward), `models` weight draws per step.
    """
    if not 0 < drop < 1:
        raise ValueError(f"drop {drop}: must be between 0 and 1")
    if not (tol > 0 and 0 < floor < limit):
        raise ValueError("need tol > 0 and 0 < floor < limit")
    _parameter_device(oracle, limit)  # fail early on a model without parameters
    wanted = 1.0 - drop
    clean = oracle.logits(x).argmax(1)
    lo, hi = float(floor), float(limit)
    for _ in range(bisection_steps(tol, floor, limit)):
        mid = math.sqrt(lo * hi)
        if weight_noise_agreement(oracle, x, mid, seed=seed, models=models, clean=clean) >= wanted:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)
