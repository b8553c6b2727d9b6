"""Evaluation: log-likelihood scoring (scoring.py), the lm-evaluation-harness model `polylm_jax`
(lm_eval_model.py), PolyLM's benchmark suite and its reports (suite.py, report.py, eval_cli.py)."""
