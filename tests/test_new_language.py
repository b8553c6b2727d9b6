"""A language outside PolyLM's 18 (Swahili) added by configuration only: its text in a file glob,
`Languages.codes` naming it. It trains with its own loss/sw and val_loss/sw, gets a curriculum
rate, a row in the tokenizer report and a Beam cache, and checkpoints remember the set."""

import json
import random

import pytest
from runs import train_args

from polylm_jax import languages
from polylm_jax.data import pipeline, sample, tokenizer_cli
from polylm_jax.errors import CheckpointMismatchError
from polylm_jax.train import cache_cli
from polylm_jax.train import train_cli as cli

WORDS = (
  "habari za asubuhi watoto wanacheza shuleni mama anapika chakula kitamu leo jua linawaka sana "
  "mvua inanyesha kesho tutakwenda sokoni kununua matunda na mboga rafiki yangu anaishi mjini "
  "kitabu hiki ni kizuri mwalimu anafundisha darasa letu baba anasoma gazeti jioni"
).split()
CODES = [*languages.POLYLM, "sw"]


def _swahili(n: int, seed: int) -> str:
  rng = random.Random(seed)
  lines = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "." for _ in range(n)]
  return "\n".join(lines) + "\n"


def _gin(tmp_path, codes):
  corpus = tmp_path / "sw"
  corpus.mkdir(exist_ok=True)
  for shard in range(2):
    (corpus / f"train-{shard}.txt").write_text(_swahili(150, shard), "utf-8")
  (corpus / "val.txt").write_text(_swahili(40, 99), "utf-8")
  path = tmp_path / f"swahili-{codes[0]}.gin"
  path.write_text(f"""
train.languages = @Languages()
Languages.codes = {codes!r}
train.corpora = @TextCorpora()
TextCorpora.files = {{'sw': {{'train': '{corpus}/train-*.txt', 'validation': '{corpus}/val.txt'}}}}
stage1/Stage.rates = {{'en': 0.5, 'sw': 0.3}}
final/Stage.counts = {{'sw': 300}}  # temperature sampling needs a size for a file corpus
""")
  return path, corpus


def _train(gin_file, workdir, steps):
  bindings = {
    "TrainerConfig.num_steps": steps,
    "OptimizerConfig.warmup_steps": 2,
    "DataConfig.seq_len": 64,
    "DataConfig.batch_size": 8,
    "TrainerConfig.eval_every": 4,
    "CheckpointConfig.every_steps": 4,
  }
  return cli.main(train_args(workdir, bindings, str(gin_file), all_languages=True))


@pytest.mark.slow
def test_a_19th_language_from_configuration(tmp_path, caplog, capsys):
  gin_file, corpus = _gin(tmp_path, CODES)
  workdir = tmp_path / "run"
  with caplog.at_level("INFO"):
    _train(gin_file, workdir, 4)
  # A curriculum rate: the explicit one in stage 1, a temperature-sampled share in the final stage.
  [stage1] = [line for line in caplog.text.splitlines() if line.startswith("stage 0 'stage1'")]
  [final] = [line for line in caplog.text.splitlines() if line.startswith("stage 1 'final'")]
  assert "sw 30.0%" in stage1 and ", sw " in final
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("loss/sw" in r for r in records)  # its own training loss (tag 19)
  [evaluation] = [
    json.loads(line) for line in (workdir / "eval_metrics.jsonl").read_text().splitlines()
  ]
  assert evaluation["val_loss/sw"] > 0 and "val_loss/en" in evaluation

  # A tokenizer report row.
  tokenizer_cli.main(["report", f"--model={sample.TOKENIZER_MODEL}", f"--input=sw={corpus}/*"])
  assert any(line.split()[:1] == ["sw"] for line in capsys.readouterr().out.splitlines())

  # A Beam cache of its packed rows, tagged with its place in the set.
  cache_dir = tmp_path / "cache"
  cache_cli.main(
    [
      f"--gin_file={gin_file}",
      "--gin_bindings=TextCorpora.cache_seq_len = 64",
      f"--cache_dir={cache_dir}",
      "--tasks=polylm_pt_sw",
    ]
  )
  assert (cache_dir / "polylm_pt_sw" / "COMPLETED").exists()
  config = pipeline.DataConfig(
    mixture="polylm_pt_sw",
    seq_len=64,
    batch_size=1,
    shuffle=False,
    use_cached=True,
    cache_dirs=(str(cache_dir),),
  )
  row = next(pipeline.batches(config, num_epochs=1))
  assert set(row["languages"][row["segment_ids"] > 0].tolist()) == {CODES.index("sw") + 1}

  # The checkpoint remembers the set: resuming with another one (here: the same languages in
  # another order, so other tags) stops and says why.
  other, _ = _gin(tmp_path, ["sw", *languages.POLYLM])
  with pytest.raises(CheckpointMismatchError, match="Languages.codes"):
    _train(other, workdir, 6)


@pytest.mark.slow
def test_two_runs_with_other_language_sets_in_one_process_each_tag_with_their_own(tmp_path):
  """The language set is the run's value, not a process-wide setting: a second run in the same
  process, with the same data but the set in another order, names its losses by its own set."""
  for codes in (["en", "de"], ["de", "en"]):
    gin_file = tmp_path / f"{codes[0]}.gin"
    gin_file.write_text(f"train.languages = @Languages()\nLanguages.codes = {codes!r}\n")
    workdir = tmp_path / codes[0]
    bindings = [
      "train.curriculum = None",
      "DataConfig.mixture = 'polylm_pt_en'",
      "TrainerConfig.num_steps = 2",
      "OptimizerConfig.warmup_steps = 1",
      "OptimizerConfig.decay_steps = 2",
      "DataConfig.seq_len = 64",
      "DataConfig.batch_size = 8",
      "TrainerConfig.eval_every = 2",
      "CheckpointConfig.enabled = False",
    ]
    cli.main(train_args(workdir, bindings, str(gin_file)))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {k for r in records for k in r if k.startswith("loss/")} == {"loss/en"}, codes
    [evaluation] = [
      json.loads(line) for line in (workdir / "eval_metrics.jsonl").read_text().splitlines()
    ]
    assert [k for k in evaluation if k.startswith("val_loss/")] == ["val_loss/en"], codes


def test_a_task_carries_its_language_set_to_a_beam_worker(tmp_path):
  """What a remote Beam runner does with a task: pickle it, load it in another process (a worker
  that never saw the run's gin config) and run its preprocessors. The tags are still the run's."""
  import subprocess
  import sys

  from apache_beam.internal import pickler

  from polylm_jax.data import sources

  corpus = tmp_path / "sw.txt"
  corpus.write_text(_swahili(20, 0), "utf-8")
  language_set = languages.Languages(codes=tuple(CODES))
  [name] = sources.TextCorpora(files={"sw": {"train": str(corpus)}}, prefix="polylm_w_").register(
    language_set=language_set
  )
  import seqio

  pickled = tmp_path / "task.pkl"
  pickled.write_bytes(pickler.dumps(seqio.TaskRegistry.get(name)))
  worker = (
    "import sys\n"
    "from apache_beam.internal import pickler\n"
    "task = pickler.loads(open(sys.argv[1], 'rb').read())\n"
    "block = next(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())\n"
    "print(sorted({int(tag) for doc in block['lang'] for tag in doc}))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", worker, str(pickled)], capture_output=True, text=True, check=True
  ).stdout
  assert out.strip().splitlines()[-1] == f"[{CODES.index('sw') + 1}]"
