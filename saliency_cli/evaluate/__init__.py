"""`saliency evaluate`: metrics of attribution maps, one module per family, each registered with its metadata.

faithfulness (deletion, insertion, aupc, keep, remove), smoothness (noise, sparseness), localisation
(pointing, energy), sanity (randomization, perturbation). `evaluate_runs(EvaluateOptions(...))` runs it all
from Python; command.py is the thin Typer command.
"""

from saliency_cli.evaluate import faithfulness, localisation, smoothness  # noqa: F401 - they register metrics
from saliency_cli.evaluate.base import REGISTRY, Batch, Metric, Scores, register
from saliency_cli.evaluate.run import EvaluateOptions, Evaluation, Failure, evaluate_runs, score_maps
from saliency_cli.evaluate.sanity import SANITY, SanityCheck

__all__ = ["REGISTRY", "SANITY", "Batch", "EvaluateOptions", "Evaluation", "Failure", "Metric", "SanityCheck",
           "Scores", "evaluate_runs", "register", "score_maps"]
