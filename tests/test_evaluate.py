"""`saliency evaluate`: every metric on a case with a known answer, the sanity checks, the reports and gates,
and one end-to-end run of the bundled model. Fixtures live here (synthetic models are built from explicit
generators, never from the global RNG)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from saliency_cli.data import InputRange
from saliency_cli.errors import SaliencyError, UsageError
from saliency_cli.methods import METHODS
from saliency_cli.methods.base import Attribution, Method, MethodContext
from saliency_cli.metrics import METRICS, SANITY_CHECKS, Batch
from saliency_cli.metrics.base import flat_rank, perturbation_curve
from saliency_cli.metrics.faithfulness import window_order
from saliency_cli.metrics.localisation import box_region, lookup, mask_region, read_boxes
from saliency_cli.metrics.sanity import cascade_stages, perturbation, randomization, reinit_layers
from saliency_cli.metrics.smoothness import gini
from saliency_cli.numerics import average_ranks, mean_ci95, spearman
from saliency_cli.oracle import GradientOracle
from saliency_cli.pipeline.evaluate import EvaluateOptions, evaluate_runs, gates, recomputer

REPO = Path(__file__).resolve().parents[1]
SIDE = 16  # side of the synthetic images
DECISIVE = (slice(4, 8), slice(8, 12))  # the 4 x 4 block of pixels the linear model looks at


# -- fixtures ---------------------------------------------------------------------------------------------
class BlockModel(torch.nn.Module):
    """Two classes; logit_0 = sum of the input over the DECISIVE block (all channels) - 1.5 * its size, logit_1
    = 0. On an all-ones input logit_0 = +24 (class 0, p ~ 1); each decisive pixel set to 0 lowers it by 3."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.zeros(3, SIDE, SIDE)
        w[:, DECISIVE[0], DECISIVE[1]] = 1.0
        self.weight = torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.weight[0].sum()
        logit0 = (x * self.weight).flatten(1).sum(1) - 1.5 * n
        return torch.stack([logit0, torch.zeros_like(logit0)], 1)


def block_mask() -> torch.Tensor:
    m = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    m[DECISIVE] = True
    return m


@pytest.fixture
def block_batch() -> Batch:
    """Two rows on the BlockModel with all-ones inputs: row 0's map ranks the decisive pixels first, row 1's
    is its reverse (decisive pixels last). A tiny raster ramp breaks ties deterministically."""
    model = BlockModel().eval()
    x = torch.ones(2, 3, SIDE, SIDE)
    ramp = torch.linspace(0, 1e-3, SIDE * SIDE).view(SIDE, SIDE)
    good = block_mask().float() + ramp
    reverse = good.max() - good
    bounds = InputRange(lo=-2 * torch.ones(3, 1, 1), hi=2 * torch.ones(3, 1, 1))
    return Batch(oracle=GradientOracle(model, batch_size=16), x=x, target=torch.zeros(2, dtype=torch.long),
                 maps=torch.stack([good, reverse]), bounds=bounds, baseline="mean", seeds=[1, 1])


def small_cnn(seed: int = 0) -> torch.nn.Module:
    """conv-relu-conv-relu-pool-linear, 5 classes, weights drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    with torch.no_grad():
        for p in m.parameters():
            fan = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn(p.shape, generator=g) / fan**0.5)
    return m.eval()


def edge_detector(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
                  generators: list[torch.Generator], ctx: MethodContext) -> Attribution:
    """|horizontal| + |vertical| finite differences of the input: a 'map' that never asks the model."""
    dx, dy = torch.zeros_like(x), torch.zeros_like(x)
    dx[..., :, 1:] = x[..., :, 1:] - x[..., :, :-1]
    dy[..., 1:, :] = x[..., 1:, :] - x[..., :-1, :]
    return Attribution(dx.abs() + dy.abs())


EDGE = Method("test-edge", edge_detector, "edges of the input", "-", {}, False, lambda h: 1)


@pytest.fixture
def cnn_case() -> tuple[torch.nn.Module, GradientOracle, torch.Tensor, torch.Tensor, MethodContext]:
    model = small_cnn()
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    oracle = GradientOracle(model, batch_size=8)
    target = oracle.logits(x).argmax(1)
    ctx = MethodContext(InputRange(lo=-3 * torch.ones(3, 1, 1), hi=3 * torch.ones(3, 1, 1)))
    return model, oracle, x, target, ctx


# -- faithfulness -----------------------------------------------------------------------------------------
def test_deletion_and_insertion_prefer_the_map_that_ranks_decisive_pixels_first(block_batch: Batch) -> None:
    """Deletion AUC: decisive-first map << its reverse; insertion AUC: decisive-first >> reverse."""
    d = METRICS["deletion"].fn(block_batch, steps=32)
    i = METRICS["insertion"].fn(block_batch, steps=32)
    assert d.values[0] < 0.15 < 0.85 < d.values[1]
    assert i.values[0] > 0.85 > 0.15 > i.values[1]
    assert d.curves is not None and d.curves.shape == (2, 33)
    # Step 0 of deletion is the clean input (p ~ 1); the last step is the all-baseline input (logit -24).
    assert torch.allclose(d.curves[:, 0], torch.ones(2), atol=1e-6)
    assert torch.allclose(d.curves[:, -1], torch.zeros(2), atol=1e-6)


def test_perturbation_curve_matches_one_input_at_a_time(block_batch: Batch) -> None:
    """Batched curve = the model on each hand-built step input (chunking does not change the answer)."""
    rank = flat_rank(block_batch.maps)
    thresholds = torch.tensor([0, 5, 17, 256])
    ref = torch.zeros_like(block_batch.x)
    out = perturbation_curve(block_batch.oracle, block_batch.x, ref, block_batch.target, rank, thresholds, block=3)
    for r in range(2):
        for s, k in enumerate(thresholds.tolist()):
            xi = torch.where((rank[r] < k)[None], ref[r], block_batch.x[r])[None]
            p = block_batch.oracle.model(xi).softmax(1)[0, 0]
            assert out.prob[r, s].item() == pytest.approx(p.item(), abs=1e-6)


def test_aupc_prefers_the_map_that_ranks_decisive_pixels_first(block_batch: Batch) -> None:
    """Uniform-noise windows over the decisive block first drop the normalised logit sooner."""
    s = METRICS["aupc"].fn(block_batch, window=4, regions=8)
    assert s.values[0] < s.values[1]
    assert s.curves is not None and torch.allclose(s.curves[:, 0], torch.ones(2))


def test_window_order_picks_the_hot_window_first_and_never_overlaps() -> None:
    m = torch.zeros(1, 12, 12)
    m[0, 6:9, 2:5] = 5.0
    m[0, 0:3, 9:12] = 1.0
    order = window_order(m, 3, regions=5)
    assert (order[0, 6:9, 2:5] == 0).all() and (order[0, 0:3, 9:12] == 1).all()
    counts = torch.bincount(order.flatten(), minlength=6)
    assert (counts[:5] == 9).all()  # five whole, disjoint 3 x 3 windows


def test_keep_and_remove_report_whether_the_prediction_survives(block_batch: Batch) -> None:
    """Keeping the 10 % top pixels keeps the class only for the decisive-first map; removing them flips it."""
    keep = METRICS["keep"].fn(block_batch, fraction=0.1).values
    remove = METRICS["remove"].fn(block_batch, fraction=0.1).values
    assert keep.tolist() == [1.0, 0.0]
    assert remove.tolist() == [0.0, 1.0]


# -- smoothness -------------------------------------------------------------------------------------------
def test_gini_is_zero_for_a_constant_map_and_maximal_for_one_pixel() -> None:
    maps = torch.stack([torch.full((8, 8), 3.0), torch.zeros(8, 8), torch.zeros(8, 8)])
    maps[1, 2, 3] = 7.0
    maps[2] = torch.arange(64.0).view(8, 8)
    g = gini(maps)
    assert g[0].item() == pytest.approx(0.0, abs=1e-7)
    assert g[1].item() == pytest.approx(1 - 1 / 64, abs=1e-6)
    assert 0 < g[2] < g[1]


def test_noise_ranks_a_smooth_map_below_the_same_map_plus_noise(block_batch: Batch) -> None:
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    blob = torch.exp(-((yy - 40) ** 2 + (xx - 55) ** 2) / (2 * 12.0**2))
    noisy = blob + 0.2 * torch.rand(96, 96, generator=torch.Generator().manual_seed(0))
    block_batch.maps = torch.stack([blob, noisy])
    s = METRICS["noise"].fn(block_batch, **METRICS["noise"].defaults)
    assert s.values[0] < s.values[1]
    assert s.curves is not None and s.curves.shape == (2, 3)  # levels of 96, 64 and 43 px (29 < 30 stops)


# -- localisation -----------------------------------------------------------------------------------------
def test_a_map_equal_to_the_object_mask_has_pointing_and_energy_one(block_batch: Batch) -> None:
    mask = block_mask()
    block_batch.maps = torch.stack([mask.float(), (~mask).float()])
    block_batch.regions = torch.stack([mask, mask])
    block_batch.has_region = torch.tensor([True, True])
    assert METRICS["pointing"].fn(block_batch).values.tolist() == [1.0, 0.0]
    assert METRICS["energy"].fn(block_batch).values.tolist() == [1.0, 0.0]
    block_batch.has_region = torch.tensor([True, False])
    assert math.isnan(METRICS["energy"].fn(block_batch).values[1].item())


def test_pointing_with_a_constant_map_is_the_chance_level(block_batch: Batch) -> None:
    mask = block_mask()
    block_batch.maps = torch.ones(2, SIDE, SIDE)
    block_batch.regions = torch.stack([mask, mask])
    block_batch.has_region = torch.tensor([True, True])
    assert METRICS["pointing"].fn(block_batch).values[0].item() == pytest.approx(16 / 256)


def test_boxes_and_masks_land_on_the_right_map_pixels(tmp_path: Path) -> None:
    """A box in original pixels, seen through a crop of [100, 50, 300, 250] at 20 x 20 (10 px per map pixel)."""
    region = box_region([(150.0, 100.0, 200.0, 130.0)], [100.0, 50.0, 300.0, 250.0], (20, 20))
    expected = np.zeros((20, 20), dtype=bool)
    expected[5:8, 5:10] = True
    assert (region == expected).all()
    from PIL import Image

    mask = np.zeros((300, 400), dtype=np.uint8)
    mask[100:130, 150:200] = 255
    Image.fromarray(mask).save(tmp_path / "cat.png")
    assert (mask_region(tmp_path / "cat.png", (400, 300), [100.0, 50.0, 300.0, 250.0], (20, 20)) == expected).all()
    # A half-size mask file is scaled to the image.
    Image.fromarray(mask[::2, ::2]).save(tmp_path / "half.png")
    assert (mask_region(tmp_path / "half.png", (400, 300), [100.0, 50.0, 300.0, 250.0], (20, 20)) == expected).all()


def test_read_boxes_json_and_csv_and_name_lookup(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps({"cat.png": [1, 2, 3, 4], "x/dog.jpg": [[0, 0, 5, 5], [6, 6, 9, 9]]}))
    (tmp_path / "b.csv").write_text("image,left,top,right,bottom\ncat.png,1,2,3,4\nx/dog.jpg,0,0,5,5\n"
                                    "x/dog.jpg,6,6,9,9\n")
    for name in ("b.json", "b.csv"):
        boxes = read_boxes(tmp_path / name)
        assert boxes["cat.png"] == [(1.0, 2.0, 3.0, 4.0)]
        assert len(boxes["x/dog.jpg"]) == 2
        assert lookup(boxes, "/data/photos/cat.png", "cat.png", set()) == [(1.0, 2.0, 3.0, 4.0)]
        assert lookup(boxes, "x/dog.jpg", "dog.jpg", set()) is not None
        with pytest.raises(UsageError):
            lookup(boxes, "/a/cat.png", "a/cat.png", {"cat.png"})  # two images are called cat.png
    (tmp_path / "bad.json").write_text(json.dumps({"cat.png": [5, 5, 1, 1]}))
    with pytest.raises(UsageError):
        read_boxes(tmp_path / "bad.json")


# -- sanity -----------------------------------------------------------------------------------------------
def test_randomization_keeps_an_edge_detector_at_one_and_decorrelates_the_gradient(cnn_case) -> None:
    model, oracle, x, target, ctx = cnn_case
    before = [p.detach().clone() for p in model.parameters()]
    edge = randomization(oracle, recomputer(EDGE, {"reduce": "abs-sum"}, oracle, x, target, [1, 2, 3], ctx))
    grad = randomization(oracle, recomputer(METHODS["gradient"], {"reduce": "abs-sum"}, oracle, x, target,
                                            [1, 2, 3], ctx))
    assert edge.stages == ["6", "2", "0"]  # classifier first, then down the network
    assert torch.allclose(edge.correlations, torch.ones_like(edge.correlations), atol=1e-6)
    assert (grad.value < 0.5).all()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # weights restored


def test_perturbation_check_edge_map_never_changes_gradient_degrades(cnn_case) -> None:
    model, oracle, x, target, ctx = cnn_case
    before = [p.detach().clone() for p in model.parameters()]
    clean_p = oracle.probabilities(x, target)
    grid = (0.01, 0.1, 1.0)
    probability = lambda: oracle.probabilities(x, target)  # noqa: E731
    edge = perturbation(oracle, recomputer(EDGE, {}, oracle, x, target, [1, 2, 3], ctx), probability, grid=grid)
    grad = perturbation(oracle, recomputer(METHODS["gradient"], {}, oracle, x, target, [1, 2, 3], ctx), probability,
                        grid=grid)
    assert edge.t == [0.0, 0.01, 0.1, 1.0]
    assert torch.allclose(edge.similarity, torch.ones_like(edge.similarity), atol=1e-6)
    assert torch.allclose(grad.probability[0], clean_p)
    assert (grad.similarity[1] > 0.9).all() and (grad.similarity[-1] < grad.similarity[1]).all()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_cascade_stages_go_top_down_and_merge_to_the_cap() -> None:
    units = [(str(i), [torch.nn.Parameter(torch.zeros(1))]) for i in range(7)]
    assert [n for n, _ in cascade_stages(units, 12)] == ["6", "5", "4", "3", "2", "1", "0"]
    merged = cascade_stages(units, 3)
    assert [n for n, _ in merged] == ["6", "5..3", "2..0"]
    assert sum(len(ps) for _, ps in merged) == 7
    assert [n for n, _ in cascade_stages(units, 0)] == ["6", "5", "4", "3", "2", "1", "0"]  # 0: every layer
    # the layers are the modules with reset_parameters() (issue 12: was the model's top-level children)
    assert [n for n, _ in reinit_layers(small_cnn())] == ["0", "2", "6"]


def test_sanity_checks_on_a_model_without_parameters_say_so() -> None:
    """A model with nothing to perturb (e.g. a frozen TorchScript module) is a clear SaliencyError, not a crash."""
    oracle = GradientOracle(torch.nn.Flatten().eval())
    for name, check in SANITY_CHECKS.items():
        with pytest.raises(SaliencyError, match="no parameters"):
            check.fn(oracle, lambda: torch.zeros(1, 4, 4), lambda: torch.ones(1), seed=0, **check.defaults)
        assert check.fn is {"randomization": randomization, "perturbation": perturbation}[name]


# -- statistics, registry, gates --------------------------------------------------------------------------
def test_spearman_with_ties_and_mean_ci95() -> None:
    a = torch.tensor([[1.0, 2.0, 2.0, 5.0]])
    assert average_ranks(a).tolist() == [[0.0, 1.5, 1.5, 3.0]]
    assert spearman(a, a * 10 + 1).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    s = mean_ci95([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3 and s["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci95([float("nan"), 4.0]) == {"mean": 4.0, "ci95": None, "n": 1}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_registered_metric_declares_itself_and_scores_each_row(name: str, block_batch: Batch) -> None:
    m = METRICS[name]
    assert m.summary and m.paper and isinstance(m.higher_is_better, bool)
    small = {"steps": 4, "regions": 3, "window": 4}
    opts = {k: small.get(k, v) for k, v in m.defaults.items()}
    assert isinstance(m.cost(m.defaults), int) and m.cost(m.defaults) >= 0
    if m.needs_regions:
        block_batch.regions = torch.stack([block_mask()] * 2)
        block_batch.has_region = torch.tensor([True, True])
    before = block_batch.oracle.passes
    values = m.fn(block_batch, **opts).values
    assert values.shape == (2,) and torch.isfinite(values).all()
    assert block_batch.oracle.passes - before == 2 * m.cost(opts)  # the declared cost is the real one


def test_score_maps_scores_in_memory_maps_like_the_registry(block_batch: Batch) -> None:
    """The helper for self-tuning methods gives the registered metric's values; (B, C, H, W) maps are |.|-summed."""
    from saliency_cli.metrics import score_maps

    b = block_batch
    direct = METRICS["deletion"].fn(b, steps=8).values
    maps3 = b.maps[:, None].expand(-1, 3, -1, -1) / 3
    via = score_maps("deletion", b.oracle, b.x, b.target, maps3, b.bounds, baseline="mean", steps=8)
    assert torch.allclose(direct, via)
    with pytest.raises(UsageError):
        score_maps("deletion", b.oracle, b.x, b.target, b.maps, b.bounds, stepz=8)


def test_gates_name_metric_and_method_and_fail_closed() -> None:
    summary = {"a": {"insertion": {"mean": 0.3, "ci95": None, "n": 2}}, "b": {"insertion": {"mean": 0.6}}}
    failures = gates(summary, {"insertion": 0.5}, {"deletion": 0.2})
    assert [(f.metric, f.method) for f in failures] == [("insertion", "a"), ("deletion", "any method")]
    assert "insertion" in failures[0].message() and "a" in failures[0].message() and "0.3" in failures[0].message()


def test_method_labels_tell_settings_and_runs_apart(tmp_path: Path) -> None:
    """A noise sweep gets one label per level; a method present in two runs is prefixed by the run's name."""
    from saliency_cli.runfolder.folder import Row, RunData, assign_labels
    from saliency_cli.runfolder.records import Record

    def run(name: str, params: list[dict[str, object]]) -> RunData:
        r = RunData(tmp_path / name, name, {})
        r.rows = [Row(r, Record(image=f"{i}.png", key=f"{i}.png", status="ok", method="smoothgrad",
                                params={**p, "seed": 0, "sigma": 0.1 * i}))
                  for i, p in enumerate(params)]
        return r

    a = run("a", [{"noise": 0.1, "samples": 4}, {"noise": 0.2, "samples": 4}])
    b = run("b", [{"noise": 0.1, "samples": 4}])
    assign_labels([a, b])
    assert [r.label for r in a.rows] == ["smoothgrad[noise=0.1]", "smoothgrad[noise=0.2]"]
    assert [r.label for r in b.rows] == ["smoothgrad"]
    c = run("c", [{"noise": 0.1, "samples": 4}])
    assign_labels([b, c])
    assert [r.label for r in b.rows + c.rows] == ["b/smoothgrad", "c/smoothgrad"]


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an explain run folder"):
        evaluate_runs(EvaluateOptions(runs=[tmp_path]))
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "manifest.jsonl").write_text("")
    for opts, message in [({"metrics": ["nope"]}, "not a metric"), ({"metrics": ["randomization"]}, "--sanity"),
                          ({"metrics": ["pointing"]}, "--boxes"), ({"baseline": "pink"}, "--baseline"),
                          ({"sanity": ["nope"]}, "--sanity"), ({"fail_under": {"nope": 1.0}}, "gate"),
                          ({"metric_options": {"deletion": {"stepz": 3}}}, "unknown option")]:
        with pytest.raises(UsageError, match=message):
            evaluate_runs(EvaluateOptions(runs=[tmp_path], **opts))  # type: ignore[arg-type]
    assert set(SANITY_CHECKS) == {"randomization", "perturbation"}


# -- end to end on the bundled model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """An explain run (smoothgrad -n 4) of two sample images, and a copy of it whose .npy maps were overwritten
    with uniform random maps. (On 6 sample images smoothgrad beat random maps on both metrics for 5 of 6 on
    deletion; these two win by a wide margin on both, so the test is not a coin toss.)

    The model runs on one intra-op thread here: on a 2-core machine shared with other jobs, two OpenMP
    threads spin-wait for each other and a forward pass cost 8x the CPU time (measured: 0.24 s vs 0.03 s)."""
    from saliency_cli.api import ExplainOptions, explain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    root = tmp_path_factory.mktemp("evaluate")
    run = root / "real"
    images = [str(REPO / "sample_images" / n) for n in ("chelsea.png", "grace_hopper.jpg")]
    explain(ExplainOptions(inputs=images, out=run, methods=["smoothgrad"], hyper={"samples": 4},
                           device="cpu"))
    shuffled = root / "random"
    shutil.copytree(run, shuffled)
    rng = np.random.default_rng(0)
    for f in sorted(shuffled.glob("*.npy")):
        np.save(f, rng.random(np.load(f).shape).astype(np.float32))
    yield run, shuffled
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_real_maps_beat_random_maps_on_insertion_and_deletion(real_runs: tuple[Path, Path]) -> None:
    run, shuffled = real_runs
    ev = evaluate_runs(EvaluateOptions(runs=[run, shuffled], metrics=["deletion", "insertion"], device="cpu",
                                       metric_options={"deletion": {"steps": 10}, "insertion": {"steps": 10}},
                                       out=shuffled.parent / "both", plots=False))
    s = ev.summary
    assert set(s) == {"real/smoothgrad", "random/smoothgrad"}
    assert s["real/smoothgrad"]["insertion"]["mean"] > s["random/smoothgrad"]["insertion"]["mean"]
    assert s["real/smoothgrad"]["deletion"]["mean"] < s["random/smoothgrad"]["deletion"]["mean"]
    assert all(v["deletion"]["n"] == 2 for v in s.values())
    data = json.loads((shuffled.parent / "both" / "evaluation.json").read_text())
    assert len(data["images"]) == 4 and data["curves"]["deletion"]["x"][-1] == 1.0


@pytest.mark.slow
def test_sanity_checks_recompute_the_runs_maps(real_runs: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = real_runs
    ev = evaluate_runs(EvaluateOptions(runs=[run], metrics=["sparseness"], sanity=["randomization"], device="cpu",
                                       sanity_options={"randomization": {"max_stages": 2}}, out=tmp_path,
                                       plots=False))
    rnd = ev.sanity["randomization"]["smoothgrad"]
    assert rnd["stages"] == ["classifier", "bn2..conv_stem"] and len(rnd["images"]) == 2
    assert ev.summary["smoothgrad"]["randomization"]["mean"] < 0.5
    # The recomputation on the clean model reproduces the stored maps (same settings, same noise, same model).
    from saliency_cli.data import input_bounds
    from saliency_cli.pipeline.evaluate import run_oracle
    from saliency_cli.runfolder.folder import load_image, read_run, reload_model

    data = read_run(run)
    model = reload_model(data, torch.device("cpu"), {})
    bounds = input_bounds(data.info["data_config"])
    oracle = run_oracle(data, model, torch.device("cpu"), int(data.info["batch_size"]))
    for row in data.rows:
        img = load_image(row, data.info["data_config"], torch.device("cpu"))
        again = recomputer(METHODS[row.record.method], row.record.params, oracle, img.x[None],
                           torch.tensor([row.target]), [img.seed], MethodContext(bounds))()[0]
        stored = torch.from_numpy(np.load(run / str(row.record.npy)))
        # equal within float32 rounding as this network amplifies it: recomputed one image at a time, where explain
        # ran a padded group of 4, so other kernels' rounding moves a few ReLU6 inputs across the kink (3e-4 here;
        # another noise draw would differ by tens of per cent)
        assert float((again - stored).norm() / stored.norm()) < 1e-3


@pytest.mark.slow
def test_cli_writes_reports_and_a_failed_gate_exits_4(real_runs: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from saliency_cli.cli import build_app

    app = build_app()
    run, _ = real_runs
    out = tmp_path / "report"
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,left,top,right,bottom\nchelsea.png,0,0,100000,100000\n")  # all of chelsea, no other
    result = CliRunner().invoke(app, ["evaluate", str(run), "--metrics", "keep,remove,sparseness,noise,pointing,energy",
                                      "--boxes", str(boxes), "-o", str(out), "--fail-under", "sparseness=0.99",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 4, result.output
    assert "gate failed" in result.stderr and "sparseness of smoothgrad" in result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert set(summary) == {"smoothgrad"}
    assert summary["smoothgrad"]["pointing"] == {"mean": 1.0, "ci95": None, "n": 1}
    assert summary["smoothgrad"]["energy"]["mean"] == pytest.approx(1.0)
    assert (out / "evaluation.json").is_file() and (out / "evaluation_plots" / "bar_sparseness.png").is_file()
    rows = list(csv.DictReader((out / "evaluation.csv").open()))
    assert [r["kind"] for r in rows].count("image") == 2 and {r["kind"] for r in rows} == {"image", "mean", "ci95",
                                                                                              "n"}
    ok = CliRunner().invoke(app, ["evaluate", str(run), "--metrics", "sparseness", "-o", str(out), "-q",
                                  "--fail-over", "sparseness=0.99", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("probability", ["softmax", "sigmoid"])
def test_perturbation_curves_use_the_models_own_probability(probability: str) -> None:
    """Deletion/insertion curves score a multi-label model (probability `sigmoid`) by the sigmoid of the target's
    logit, a single-label one by its softmax: checked at every step against the logits of the same inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
    oracle = GradientOracle(model, batch_size=3, probability=probability)
    x, ref = torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    target = torch.tensor([1, 3])
    order = torch.arange(16).view(1, 4, 4).repeat(2, 1, 1)
    thresholds = torch.tensor([0, 8, 16])
    out = perturbation_curve(oracle, x, ref, target, order, thresholds)
    for s, k in enumerate(thresholds.tolist()):
        mask = (order < k)[:, None]
        logits = model(torch.where(mask, ref, x)).detach()
        probs = logits.sigmoid() if probability == "sigmoid" else logits.softmax(1)
        expected = probs.gather(1, target.view(-1, 1)).squeeze(1)
        torch.testing.assert_close(out.prob[:, s], expected)
        torch.testing.assert_close(out.logit[:, s], logits.gather(1, target.view(-1, 1)).squeeze(1))
