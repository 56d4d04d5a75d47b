"""`saliency methods`: every method, its defaults and settings, cost per image and paper (`--json` for data)."""

from __future__ import annotations

from typing import Any

from saliency_cli.cli import options as o
from saliency_cli.cli.console import listing


def _cells(r: dict[str, Any]) -> list[str]:
    defaults = ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) or "-"
    cost = str(r["cost"]) + (f" (cheap: {r['cheap_cost']})" if r["cheap"] else "")
    return [r["name"], r["summary"], defaults, "yes" if r["stochastic"] else "no", cost, r["paper"]]


def list_methods(json_out: o.JsonOut = False) -> None:
    """Every method: summary, paper, defaults, whether it is stochastic, and its cost per image."""
    from saliency_cli.api import list_methods as rows_of

    listing(rows_of(), json_out, "saliency methods (cost: passes per image at the defaults)",
            ["name", "summary", "defaults", "stochastic", "cost", "paper"], _cells)
