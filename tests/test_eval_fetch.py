"""polylm-eval fetch: what a run without network or without a task's data says (every task
fetched and not fetched, the Hub named, the Hub client's retries shown once each)."""

import os
import socket
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lm_eval")
from polylm_jax.errors import MissingDataError  # noqa: E402
from polylm_jax.eval import suite  # noqa: E402


def test_fetch_failures_name_every_task_not_fetched(lm_eval_tasks):
  """polylm-eval fetch without the data (here: a task whose files are missing) says what was and
  was not fetched, and does not advise running fetch again."""
  include = lm_eval_tasks
  yaml = (include / "polylm_test_mc_en.yaml").read_text()
  for lang in ("aa", "bb"):
    (include / f"polylm_test_missing_{lang}.yaml").write_text(
      yaml.replace("task: polylm_test_mc_en", f"task: polylm_test_missing_{lang}").replace(
        "mc_en.jsonl", f"missing_{lang}.jsonl"
      )
    )
  specs = [
    suite.Spec(t, "missing", t[-2:], "acc")
    for t in ("polylm_test_mc_en", "polylm_test_missing_aa", "polylm_test_missing_bb")
  ]
  with pytest.raises(MissingDataError) as e:
    suite.load_tasks(specs, suite.task_manager(str(include)), fetching=True)
  message = str(e.value)
  assert "task polylm_test_missing_aa: its data could not be downloaded" in message
  assert "Fetched: 1 of 3 task(s); not fetched: polylm_test_missing_aa, polylm_test_missing_bb" in (
    message
  )
  assert "polylm-eval fetch" not in message


def _fetch(tmp_path, endpoint: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and k != "XLA_FLAGS"}
  env.update(HF_ENDPOINT=endpoint, HF_DATASETS_OFFLINE="0", HF_HUB_OFFLINE="0")
  return subprocess.run(
    [sys.executable, "-m", "polylm_jax.eval", "fetch", "--tasks=xcopa_id"]
    + [f"--data_dir={tmp_path / 'hf'}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=1800,
  )


def test_fetch_without_network_fails_at_once_naming_the_hub(tmp_path):
  """A Hub that does not resolve: one line before lm-eval is even loaded, no retries."""
  proc = _fetch(tmp_path, "https://no-such-hub.invalid")
  assert proc.returncode == 2
  assert "Retrying" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("polylm-eval: fetch needs network access to the Hugging Face Hub")
  assert "no-such-hub.invalid does not resolve" in last and "nothing was fetched" in last


@pytest.mark.slow
def test_fetch_from_a_hub_that_refuses_shows_each_retry_once_and_names_every_task(tmp_path):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = _fetch(tmp_path, f"http://127.0.0.1:{port}")
  assert proc.returncode == 2
  retries = [line for line in proc.stderr.splitlines() if "Retrying in" in line]
  assert retries and len(retries) == len(set(retries)), proc.stderr  # the Hub client's, once each
  assert all(" WARNING " in line for line in retries)  # formatted as every other line
  assert "aggregation is not" not in proc.stderr
  assert "not fetched: xcopa_id" in proc.stderr.strip().splitlines()[-1]
