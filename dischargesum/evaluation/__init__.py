"""Evaluation: score predictions against references and sources, and write the report."""
