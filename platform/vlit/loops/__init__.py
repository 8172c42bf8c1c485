"""Synthetic data loops: preference pairs (VLFeedback), and the data that feeds them."""
