"""Evaluation: the guidance-scale Pareto sweep (COCO prompts, generation runs, table, plot) and contact sheets."""
