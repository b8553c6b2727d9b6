"""Controlled experiments: a grid of training variants (arms), each trained, evaluated and
compared against a baseline (`polylm-sweep`). spec.py: what a sweep is and its arms; runner.py:
training and evaluating them one after another, or printing launcher jobs; report.py: the
comparison tables and charts."""
