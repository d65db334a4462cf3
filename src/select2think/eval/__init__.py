"""Evaluation: datasets, prompts and grading."""
