"""Pruning Explorer: importance analysis, sparsity allocation and structural pruning of
transformer models. Pure Python (no UI imports); the Gradio app in `app.py` is a thin layer
over this package, and `python -m explorer` is its command line."""

__version__ = "0.1.0"
