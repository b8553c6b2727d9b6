"""lm-eval tasks on the live parameters, every N steps of a training run (no export, no second
process): TrainerConfig.lm_eval_tasks / lm_eval_every. Accuracy per task (and so per language)
goes to eval_metrics.jsonl and TensorBoard next to the held-out loss, with the seconds it took.

Task data is loaded when the run starts, so a missing dataset stops the run before training.
"""

from __future__ import annotations

import logging
import time
from typing import Any


class Benchmark:
  """Callable(step_fn, params) -> {"lm_eval/<task>/<metric>": value, "lm_eval_seconds": s}."""

  def __init__(
    self,
    task_names,
    tokenizer_model: bytes,
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    include_path: str | None = None,
    batch_size: int = 16,
    languages=(),
  ):
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sentencepiece as spm

    from polylm_jax.eval import suite

    # One TaskManager for every evaluation: building one indexes lm-eval's ~14,000 task YAMLs
    # (about 12 s), which simple_evaluate would otherwise do at every call.
    self.manager = manager = suite.task_manager(include_path)
    self.specs = suite.resolve(list(task_names), list(languages), set(manager.all_tasks))
    self.tasks = suite.load_tasks(self.specs, manager)
    self.sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    self.limit, self.batch_size = limit, batch_size
    for task in self.tasks.values():
      suite.set_num_fewshot(task, num_fewshot)
    self._lm: Any = None  # eval.lm_eval_model.PolyLMJax, made at the first evaluation
    logging.info("in-training evaluation: %s", ", ".join(s.task for s in self.specs))

  def _model(self, step_fn, params):
    from polylm_jax.eval.lm_eval_model import PolyLMJax

    if self._lm is None:
      self._lm = PolyLMJax.from_parts(
        step_fn.model_config,
        params,
        self.sp,
        mesh=step_fn.mesh,
        rules=step_fn.rules,
        batch_size=self.batch_size,
      )
      self._lm.show_progress = False
    self._lm.set_params(params)
    return self._lm

  def __call__(self, step_fn, params) -> dict[str, Any]:
    from lm_eval import evaluator

    began = time.perf_counter()
    lm = self._model(step_fn, params)
    out: dict[str, Any] = {}
    result = evaluator.simple_evaluate(
      model=lm,
      tasks=[self.tasks[s.task] for s in self.specs],
      num_fewshot=None,  # set on the tasks at start
      limit=self.limit,
      bootstrap_iters=0,
      log_samples=False,
      task_manager=self.manager,
    )
    for spec in self.specs:
      for key, value in result["results"][spec.task].items():
        metric = key.split(",")[0]
        if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
          out[f"lm_eval/{spec.task}/{metric}"] = float(value)
    out["lm_eval_seconds"] = time.perf_counter() - began
    logging.info(
      "in-training evaluation took %.1f s: %s",
      out["lm_eval_seconds"],
      {k: round(v, 4) for k, v in out.items() if k.startswith("lm_eval/")},
    )
    return out
