"""saliency: noise-smoothing attribution maps for image classifiers, from the command line."""

__version__ = "0.1.0"
