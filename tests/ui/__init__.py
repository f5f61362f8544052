"""Helpers of the slow UI test (``tests/test_ui.py``), which drives the MLflow UI in Chromium."""
