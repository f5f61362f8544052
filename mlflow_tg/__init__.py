"""Temporal graph summaries of neural-network training, tracked in MLflow."""

__version__ = "0.1.0"
