"""The lm-eval model `polylm_jax`: per-request log-likelihoods equal lm-eval's own `hf` model on the
export (float32, 1e-3) and accuracies are identical, on local tasks (tests/fixtures/lm_eval); few
compiled shapes; generation tasks run."""

import collections
import json
import os
import pathlib

import jax
import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import evaluator  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from polylm_jax.eval import lm_eval_model  # noqa: E402
from polylm_jax.export import cli as export_cli  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "lm_eval"


def local_tasks(tmp_path) -> pathlib.Path:
  """The fixture task YAMLs with their data paths filled in."""
  out = tmp_path / "tasks"
  out.mkdir(exist_ok=True)
  for yaml in FIXTURES.glob("*.yaml"):
    (out / yaml.name).write_text(yaml.read_text().replace("{FIXTURES}", str(FIXTURES)))
  return out


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
  from polylm_jax.train import cli

  root = tmp_path_factory.mktemp("lmeval")
  cli.main(
    [
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={root / 'run'}",
      "--gin_bindings=TrainerConfig.num_steps = 30",
      "--gin_bindings=DataConfig.seq_len = 64",
      "--gin_bindings=DataConfig.batch_size = 8",
      "--gin_bindings=TrainerConfig.eval_every = 0",
      "--gin_bindings=OptimizerConfig.warmup_steps = 5",
    ]
  )
  assert export_cli.main([f"--workdir={root / 'run'}", f"--out={root / 'hf'}"]) == 0
  return root / "run", root / "hf"


def _evaluate(model, tasks, include, **kwargs):
  return evaluator.simple_evaluate(
    model=model,
    tasks=tasks,
    task_manager=TaskManager(include_path=str(include)),
    log_samples=True,
    bootstrap_iters=0,
    **kwargs,
  )


def test_loglikelihoods_and_accuracy_equal_lm_evals_hf_model(run_and_export, tmp_path):
  workdir, hf_dir = run_and_export
  include = local_tasks(tmp_path)
  tasks = ["polylm_test_mc_en", "polylm_test_mc_th"]
  ours = lm_eval_model.PolyLMJax(workdir=str(workdir), batch_size=8, dtype="float32")
  mine = _evaluate(ours, tasks, include)
  from lm_eval.models.huggingface import HFLM

  theirs = _evaluate(
    HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=8, device="cpu"), tasks, include
  )
  for task in tasks:
    assert mine["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    a = [r[0][0] for s in mine["samples"][task] for r in s["resps"]]
    b = [r[0][0] for s in theirs["samples"][task] for r in s["resps"]]
    assert len(a) == len(b) == 30 and len(set(np.round(a, 3))) > 20  # real, varied numbers
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
  # Sorted by length and padded to a few buckets: a handful of compiled shapes for 60 requests.
  assert len(ours.scorer.compiled_shapes) <= 6


def test_rolling_loglikelihood_and_generation_tasks(run_and_export, tmp_path):
  workdir, hf_dir = run_and_export
  ours = lm_eval_model.PolyLMJax(hf_dir=str(hf_dir), batch_size=4)
  result = _evaluate(ours, ["polylm_test_gen_en"], local_tasks(tmp_path))
  samples = result["samples"]["polylm_test_gen_en"]
  assert len(samples) == 10 and all(isinstance(s["resps"][0][0], str) for s in samples)
  assert 0.0 <= result["results"]["polylm_test_gen_en"]["exact_match,none"] <= 1.0

  class Request:
    def __init__(self, text):
      self.args = (text,)

  texts = ["Hello world, this is a test.", "x" * 700]  # the second spans several windows
  rolling = ours.loglikelihood_rolling([Request(t) for t in texts], disable_tqdm=True)
  # The same sums, token by token from the whole forward (BOS, then the text).
  from polylm_jax.model import params as P

  forward = jax.jit(lambda p, x: jax.nn.log_softmax(P.apply(ours.scorer.graphdef, p, x), -1))
  for text, got in zip(texts[:1], rolling[:1]):
    ids = [1] + ours.sp.encode(text)
    logp = np.asarray(forward(ours.scorer.params, np.asarray([ids[:-1]])))[0]
    want = float(sum(logp[i, t] for i, t in enumerate(ids[1:])))
    assert abs(got - want) < 1e-3
  assert rolling[1] < rolling[0] < 0


def test_generated_answers_equal_lm_evals_hf_model_cut_at_the_first_stop(run_and_export, tmp_path):
  """`until` cuts the text at the first stop string whatever ended the generation: also where
  the stop string came in the same chunk of tokens as the length limit, as lm-eval's `hf` model
  cuts it."""
  workdir, hf_dir = run_and_export
  include = local_tasks(tmp_path)
  ours = lm_eval_model.PolyLMJax(workdir=str(workdir), batch_size=4, dtype="float32")
  from lm_eval.models.huggingface import HFLM

  theirs = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=4, device="cpu")
  texts = lambda model, task: [
    s["resps"][0][0] for s in _evaluate(model, [task], include)["samples"][task]
  ]
  # A stop string the model writes after its answers' first token (which comes alone, from the
  # prefill): it arrives in the chunk of tokens that also reaches the length limit.
  plain = texts(ours, "polylm_test_gen_en")

  def after_first_token(o: str) -> bool:
    first = ours.sp.decode(ours.sp.encode(o)[:1])
    return o.find(o[-2:]) + 2 > len(first)

  ends = collections.Counter(
    o[-2:] for o in plain if len(o) >= 4 and "\n" not in o[-2:] and after_first_token(o)
  )
  assert ends, plain
  stop = ends.most_common(1)[0][0]
  task = "polylm_test_gen_stop_en"
  yaml = (include / "polylm_test_gen_en.yaml").read_text()
  until = "  until:\n    - " + json.dumps(stop) + '\n    - "\\n"\n'
  (include / f"{task}.yaml").write_text(
    yaml.replace("task: polylm_test_gen_en", f"task: {task}").replace(
      '  until:\n    - "\\n"\n', until
    )
  )
  assert json.dumps(stop) in (include / f"{task}.yaml").read_text()
  mine, hf = texts(ours, task), texts(theirs, task)
  assert mine == hf
  assert sum(len(m) < len(p) for m, p in zip(mine, plain)) >= 1 and not any(stop in m for m in mine)
