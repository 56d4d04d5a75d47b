"""NoiseGrad and FusionGrad: noise on the model's weights (Bykov, Hedström, Nakajima, Höhne; AAAI 2022).

A noisy model multiplies every parameter (conv/linear weights and biases, BatchNorm gamma and beta, the
classifier) elementwise by an independent draw `eta ~ N(1, s^2)`; buffers such as BatchNorm running statistics
stay untouched. `oracle.weights_perturbed()` does this in place from one clean copy of the parameters and
writes the clean values back in `finally`: no deep copy, no `load_state_dict` per draw.

Noisy model m draws its `eta` from a generator seeded from (run seed, m) only, so every image of a run, in
whatever batch, is explained with the same M noisy models; the input noise of fusiongrad comes from each
image's own generator. Both methods return the raw signed mean and display `abs-sum` by default, which is the
reference's display (it averages abs, channel-summed maps; ours averages first and lets the reducer decide).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from saliency_cli.methods.base import (
    Attribution,
    MethodContext,
    SampleStats,
    gaussian,
    register,
    relative_sigma,
    sample_result,
    stream_gradients,
)
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


def resolve_weight_noise(value: Any, oracle: GradientOracle, x: torch.Tensor, ctx: MethodContext) -> float:
    """`s` as a float >= 0. `auto` is calibrated on x: the pipeline calls this once per run on the run's
    calibration images (its registered resolver) and passes the number; a direct call calibrates on its batch."""
    if value == "auto":
        return calibrate_weight_noise(oracle, x, seed=ctx.seed)
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


@register("noisegrad", summary="Mean gradient over M models with multiplicative N(1, s^2) weight noise",
          paper=PAPER, defaults={"weight_noise": WEIGHT_NOISE_DEFAULT, "models": 10}, stochastic=True,
          cost=lambda h: int(h["models"]), reduce="abs-sum", resolvers={"weight_noise": resolve_weight_noise})
def noisegrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
              generators: list[torch.Generator], ctx: MethodContext, weight_noise: float | str,
              models: int) -> Attribution:
    """mean_m g_m(x), where g_m is the input gradient of the target score under weights `theta * eta_m`,
    `eta_m ~ N(1, s^2)` elementwise, s = weight_noise. (B, C, H, W)

    Cost: M gradient passes per image, plus one weight draw per model, shared by all images of the batch (for
    the bundled model's 4.65 M parameters about 13 ms per draw on 2 idle CPU cores, against about 150 ms for one
    image's gradient pass).
    stats: weight_noise (B,), the s used; dropped_samples, noisy models whose gradient was not finite.
    """
    s = resolve_weight_noise(weight_noise, oracle, x, ctx)
    device = _parameter_device(oracle, s)
    stats = SampleStats()
    with oracle.parameters_edited() as editor:
        for m in range(int(models)):  # one noisy model at a time: all images of the batch go through it at once
            editor.scale_by_noise(weight_generator(ctx.seed, m, device), s)
            g, _ = oracle.gradients(x, target)
            stats.update(g[:, None])  # (B, C, H, W) -> (B, 1, C, H, W): one sample per image
    assert stats.mean is not None
    s_used = torch.full((x.shape[0],), s, dtype=torch.float64, device=x.device)
    return sample_result(stats, stats.mean, weight_noise=s_used)


@register("fusiongrad", summary="SmoothGrad on each of M weight-noised models (NoiseGrad x SmoothGrad)",
          paper=PAPER,
          defaults={"weight_noise": WEIGHT_NOISE_DEFAULT, "models": 10, "noise": FUSION_NOISE, "samples": 10},
          stochastic=True, cost=lambda h: int(h["models"]) * int(h["samples"]), reduce="abs-sum",
          cheap={"models": 5, "samples": 5}, resolvers={"weight_noise": resolve_weight_noise})
def fusiongrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
               generators: list[torch.Generator], ctx: MethodContext, weight_noise: float | str, models: int,
               noise: float, samples: int) -> Attribution:
    """mean_m mean_n g_m(x + e_mn), e_mn ~ N(0, sigma^2), sigma = noise * (max(x) - min(x)) per image, and g_m
    the gradient under weights `theta * eta_m`, `eta_m ~ N(1, s^2)`. (B, C, H, W)

    noise is relative: the default 0.085 is the reference's 0.4 absolute in ImageNet-normalised units divided by
    a typical image range of about 4.7. All M*N input draws of an image are taken from its generator at once, so
    the map does not depend on chunking; the N inputs of a noisy model go through it as one batch.
    stats: sigma (B,), the absolute input noise; weight_noise (B,); dropped_samples.
    """
    s = resolve_weight_noise(weight_noise, oracle, x, ctx)
    device = _parameter_device(oracle, s)
    b, n_models, n = x.shape[0], int(models), int(samples)
    sigma = relative_sigma(x, noise)  # (B,)
    eps = gaussian(generators, n_models * n, x) * sigma.view(-1, 1, 1, 1, 1)  # (B, M*N, C, H, W)
    eps = eps.view(b, n_models, n, *x.shape[1:])  # (B, M*N, C, H, W) -> (B, M, N, C, H, W)
    stats = SampleStats()
    with oracle.parameters_edited() as editor:
        for m in range(n_models):
            editor.scale_by_noise(weight_generator(ctx.seed, m, device), s)
            stream_gradients(oracle, x[:, None] + eps[:, m], target, stats)
    assert stats.mean is not None
    s_used = torch.full((b,), s, dtype=torch.float64, device=x.device)
    return sample_result(stats, stats.mean, sigma=sigma, weight_noise=s_used)


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
    agree = 0
    with oracle.parameters_edited() as editor:
        for m in range(int(models)):
            editor.scale_by_noise(weight_generator(seed, m, device), s)
            agree += int((oracle.logits(x).argmax(1) == clean).sum())
    return agree / (int(models) * x.shape[0])


def calibrate_weight_noise(oracle: GradientOracle, x: torch.Tensor, *, seed: int, drop: float = 0.05,
                           models: int = 10, tol: float = 0.05, start: float = 0.2, limit: float = 4.0,
                           floor: float = 1e-6) -> float:
    """The weight noise s at which the noisy models keep about `1 - drop` top-1 agreement with the clean model
    on the images x (N, C, H, W): the paper's heuristic (about 5 % relative loss of agreement, drop = 0.05).

    Bisection on s with the invariant agreement(lo) >= 1 - drop > agreement(hi). The bracket is found from
    `start` by doubling (up to `limit`, returned if the model never loses that much agreement) or halving (down
    to `floor`, returned if even that loses too much), then halved geometrically (models differ by orders of
    magnitude: s = 0.2 keeps no agreement at all on the bundled efficientnet_lite0, whose s is about 0.007)
    until hi / lo <= 1 + tol, and its geometric midpoint is returned: s to within a relative `tol`.

    Deterministic given the seed: every evaluation uses the same M noisy draws (see `weight_noise_agreement`).
    The agreement is a share of models * N votes, so few images give a coarse answer. Cost per evaluation:
    models * N forward passes (no backward) and `models` weight draws; about 10 evaluations from the defaults.
    """
    if not 0 < drop < 1:
        raise ValueError(f"drop {drop}: must be between 0 and 1")
    if not (tol > 0 and 0 < floor <= start <= limit):
        raise ValueError("need tol > 0 and 0 < floor <= start <= limit")
    _parameter_device(oracle, start)  # fail early on a model without parameters
    wanted = 1.0 - drop
    clean = oracle.logits(x).argmax(1)

    def keeps(s: float) -> bool:
        return weight_noise_agreement(oracle, x, s, seed=seed, models=models, clean=clean) >= wanted

    s = float(start)
    if keeps(s):
        lo = s
        while True:  # grow until the agreement is lost
            if lo >= limit:
                return float(limit)
            hi = min(2.0 * lo, float(limit))
            if not keeps(hi):
                break
            lo = hi
    else:
        hi = s
        while True:  # shrink until the agreement is kept
            if hi <= floor:
                return float(floor)
            lo = max(0.5 * hi, float(floor))
            if keeps(lo):
                break
            hi = lo
    while hi / lo > 1.0 + tol:
        mid = math.sqrt(lo * hi)
        if keeps(mid):
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)
