"""The method registry. Importing this package registers every method; `REGISTRY[name]` looks one up."""

from saliency_cli.methods import gradient, integrated, smoothgrad  # noqa: F401 - imports register
from saliency_cli.methods.base import REGISTRY, Attribution, Context, Method

__all__ = ["REGISTRY", "Attribution", "Context", "Method"]
