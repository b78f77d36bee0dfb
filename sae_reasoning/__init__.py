"""sae-reasoning: base models know how to reason, thinking models learn when (arXiv 2510.07364)."""

__version__ = "0.1.0"
