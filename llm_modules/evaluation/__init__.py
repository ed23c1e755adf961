"""Evaluation: the held-out harness (bits per byte, answers), scorers over composed and plain models, and
the lm-evaluation-harness adapter."""
