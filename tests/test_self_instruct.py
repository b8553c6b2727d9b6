"""Self-instruct end to end against a local chat endpoint started by the test (429s, 500s,
malformed bodies), filters counted, a killed run resumed without duplicates, the output read by
the instruction task family; ROUGE-L equals plain dynamic programming."""

import http.server
import json
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from polylm_jax.data import instructions, sample
from polylm_jax.self_instruct import filters, rouge
from polylm_jax.self_instruct.self_instruct_cli import main as self_instruct_main

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = {"Thai": "th", "Vietnamese": "vi"}


class FakeEndpoint(http.server.ThreadingHTTPServer):
  """/v1/chat/completions answering like a chat model: new tasks in the asked language (sentences
  of the embedded corpus), some of them for the filters to catch; request 1 is a 429, every 7th
  a malformed body, every 11th a 500."""

  def __init__(self, delay_s: float = 0.0):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.count, self.lock, self.delay_s = 0, threading.Lock(), delay_s

  @property
  def base_url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):
    pass

  def do_POST(self):
    server = self.server
    with server.lock:
      server.count += 1
      n = server.count
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    prompt = body["messages"][0]["content"]
    time.sleep(server.delay_s)
    if n == 1 or n % 11 == 0:
      self.send_response(429 if n == 1 else 500)
      self.end_headers()
      return
    if n % 7 == 0:
      payload = b"{not json"
    else:
      lang = next(code for name, code in NAMES.items() if f"written in {name}" in prompt)
      first = int(prompt.rsplit("###\n", 1)[1].split(".")[0])
      lines, english = sample.sample_lines(lang), sample.sample_lines("en")
      rng = random.Random(n)
      picks = rng.sample(range(len(lines)), 4)
      tasks = [(lines[i], lines[(i + 1) % len(lines)]) for i in picks]
      tasks.append((english[picks[0]], lines[picks[0]]))  # English: wrong language
      tasks.append((lines[picks[1]], lines[picks[2]]))  # asked before in this response
      text = ""
      for k, (instruction, output) in enumerate(tasks):
        number = first + k
        head = f" {instruction}" if k == 0 else f"###\n{number}. Instruction: {instruction}"
        text += f"{head}\n{number}. Input:\n<noinput>\n{number}. Output:\n{output}\n"
      text += "###\nthis chunk has no task format\n"
      payload = json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": text}}]}
      ).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.end_headers()
    self.wfile.write(payload)


@pytest.fixture
def endpoint():
  server = FakeEndpoint(delay_s=0.05)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()


def _seeds(path):
  lines = [
    json.dumps(
      {
        "lang": lang,
        "instruction": f"{sample.sample_lines(lang)[i]}?",
        "input": "",
        "output": sample.sample_lines(lang)[i + 50],
      },
      ensure_ascii=False,
    )
    for lang in ("th", "vi")
    for i in range(3)
  ]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _args(endpoint, tmp_path, **extra):
  options = {
    "seeds": _seeds(tmp_path / "seeds.jsonl"),
    "out_dir": tmp_path / "out",
    "base_url": endpoint.base_url,
    "model": "fake",
    "languages": "th,vi",
    "target_per_language": 40,
    "max_requests": 30,
    "concurrency": 3,
    "backoff_s": 0.01,
    **extra,
  }
  return [f"--{k}={v}" for k, v in options.items()]


def _records(path):
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_self_instruct_end_to_end_with_retries_filters_and_resume(endpoint, tmp_path, capsys):
  assert self_instruct_main(_args(endpoint, tmp_path, max_requests=12)) == 0
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  requests = report["requests"]
  assert requests["requests"] == 12 and requests["retries"] >= 2  # the 429 and the 500
  assert requests["malformed_responses"] >= 1
  for lang in ("th", "vi"):
    decisions = report["languages"][lang]["decisions"]
    assert decisions["kept"] > 0 and decisions["wrong_language"] > 0
    assert (
      decisions["unparseable"] > 0
      and decisions.get("duplicate", 0) + decisions.get("similar", 0) > 0
    )
    kept = _records(tmp_path / "out" / f"{lang}.jsonl")
    assert len(kept) == decisions["kept"] and all(r["lang"] == lang for r in kept)
    assert len({r["instruction"] for r in kept}) == len(kept)
  # Started again, it goes on from what it kept, never keeping an instruction twice.
  first = {lang: len(_records(tmp_path / "out" / f"{lang}.jsonl")) for lang in ("th", "vi")}
  assert self_instruct_main(_args(endpoint, tmp_path, max_requests=12)) == 0
  for lang in ("th", "vi"):
    kept = _records(tmp_path / "out" / f"{lang}.jsonl")
    assert len(kept) > first[lang] and len({r["instruction"] for r in kept}) == len(kept)
  # The output feeds the instruction task family as it is.
  stats = instructions.InstructionCorpora(
    directory=str(tmp_path / "out"),
    file_pattern="{lang}.jsonl",
    prefix="si_test_",
    mixture="si_test",
    holdout_fraction=0.0,
  ).register(seq_len=128)
  assert sorted(stats) == ["th", "vi"] and all(s["skipped"] == {} for s in stats.values())


def test_a_killed_run_continues_without_duplicates(endpoint, tmp_path):
  endpoint.delay_s = 0.3  # slow enough to kill mid-run
  args = _args(endpoint, tmp_path, max_requests=200, target_per_language=60, concurrency=2)
  proc = subprocess.Popen(
    [sys.executable, "-m", "polylm_jax.self_instruct", *args],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  out = tmp_path / "out" / "th.jsonl"
  while (
    not out.is_file() or len(out.read_text(encoding="utf-8").splitlines()) < 5
  ) and proc.poll() is None:
    time.sleep(0.05)  # waits on progress
  assert proc.poll() is None, "the first run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = len(_records(out))
  assert 5 <= before < 60
  endpoint.delay_s = 0.0
  assert self_instruct_main(args) == 0
  kept = _records(out)
  assert len(kept) == 60 and len({r["instruction"] for r in kept}) == 60 and before <= 60


def test_rouge_l_matches_dynamic_programming_and_tokenizes_by_script():
  assert rouge.tokenize("Hello, World!", "en") == ["hello", "world"]
  assert rouge.tokenize("สวัสดี ครับ", "th") == list("สวัสดีครับ")
  for lang in ("en", "ja", "th"):
    lines = sample.sample_lines(lang)
    pool = rouge.Pool(lang)
    for line in lines[:50]:
      pool.add(line)
    for candidate in lines[45:60]:
      a = rouge.tokenize(candidate, lang)
      want = 0.0
      for reference in lines[:50]:
        b = rouge.tokenize(reference, lang)[: rouge.MAX_TOKENS]
        common = rouge.lcs(a, b)
        if common:
          p, r = common / len(a), common / len(b)
          want = max(want, 2 * p * r / (p + r))
      assert pool.max_similarity(candidate) == pytest.approx(want, abs=1e-12)
  checks = filters.Filters()
  checks.remember("en", "Write a poem about the sea.")
  assert (
    checks.reason("en", {"instruction": "Write a poem about the sea!", "output": "x"})
    == "duplicate"
  )
  assert (
    checks.reason("en", {"instruction": "Draw a picture of a cat please", "output": "A cat."})
    == "banned_keyword"
  )
  assert checks.reason("en", {"instruction": "Hi", "output": "Hello"}) == "too_short"


def test_nothing_generated_exits_non_zero_and_says_so(tmp_path, capsys):
  """Every request failing (nothing listens on the port) is a failed run: `self-instruct &&
  train` must not go on."""
  import socket

  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

  class Closed:
    base_url = f"http://127.0.0.1:{port}/v1"

  code = self_instruct_main(_args(Closed, tmp_path, max_requests=4, max_retries=1))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1
  assert err[-1].startswith("polylm-self-instruct: nothing was generated: of 4 requests 4 failed")


def test_the_data_report_describes_each_language_of_any_alpaca_file(tmp_path, capsys):
  from polylm_jax.self_instruct import self_instruct_cli as cli

  records = [
    {"instruction": "Write a poem about the sea.", "input": "", "output": "Waves roll in."},
    {"instruction": "Write a poem about the sea.", "input": "", "output": "Blue and deep."},
    {"instruction": "Explain how rain forms in clouds.", "output": "Water vapour condenses."},
    {"instruction": "Écris un poème sur la mer et le vent.", "output": "La mer chante."},
  ]
  (tmp_path / "en.jsonl").write_text("\n".join(json.dumps(r) for r in records), "utf-8")
  # A JSON list whose records name their language.
  (tmp_path / "mixed.json").write_text(
    json.dumps(
      [{"lang": "de", "instruction": "Schreibe ein Gedicht über das Meer.", "output": "Ja."}]
    ),
    "utf-8",
  )
  out = tmp_path / "report"
  assert (
    cli.main(["report", str(tmp_path / "en.jsonl"), str(tmp_path / "mixed.json"), f"--out={out}"])
    == 0
  )
  summary = json.loads((out / "report.json").read_text())
  en = summary["en"]
  assert en["count"] == 4 and en["duplicates"] == 1 and summary["de"]["count"] == 1
  assert en["instruction_purity"] == 0.75  # the French instruction
  assert en["share_similar"] == pytest.approx(1 / 3)  # the repeat; the others differ
  assert en["first_words"][0] == ["write", 2]
  assert "| en | 4 | 1 |" in (out / "report.md").read_text()
  assert (out / "rouge_l.png").read_bytes()[:4] == b"\x89PNG"
  # The embedded MultiAlpaca-format sample: 11 languages, instructions all in their language.
  from polylm_jax.data import instructions

  sample = sorted(str(p) for p in instructions.SAMPLE_DIR.glob("*.jsonl"))
  assert cli.main(["report", *sample, f"--out={tmp_path / 'sample'}"]) == 0
  described = json.loads((tmp_path / "sample" / "report.json").read_text())
  assert len(described) == 11 and all(s["instruction_purity"] == 1.0 for s in described.values())
  # A record without an instruction: refused naming the file and line.
  (tmp_path / "bad.jsonl").write_text('{"instruction": "Hi there, friend"}\n{"output": "x"}\n')
  assert cli.main(["report", str(tmp_path / "bad.jsonl"), f"--out={tmp_path / 'x'}"]) == 2
  assert f"{tmp_path / 'bad.jsonl'}:2: no 'instruction' string field" in capsys.readouterr().err
