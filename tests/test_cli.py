"""The gin-configured trainer end to end: outputs, determinism, start-up errors, the quickstart."""

import json
import os
import pathlib

import pytest
from runs import FEW_LANGUAGES, SHORT_BINDINGS

from polylm_jax.train import train_cli as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
ALL_LANGUAGES = [
  "TrainerConfig.num_steps = 6",
  "TrainerConfig.log_every = 2",
  "TrainerConfig.eval_every = 0",  # held-out sets cost seconds to build; one test turns them on
  *SHORT_BINDINGS,
]
SHORT = ALL_LANGUAGES + list(FEW_LANGUAGES)


def _losses(workdir):
  return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """One 6-step run (its result and workdir), read by several tests."""
  workdir = tmp_path_factory.mktemp("short")
  result = cli.main(
    [
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={workdir}",
      *[f"--gin_bindings={b}" for b in SHORT],
    ]
  )
  return result, workdir


def test_short_run_writes_metrics_events_and_config(short_run):
  result, tmp_path = short_run
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for r in records:
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_sec", "step_time_s"):
      assert isinstance(r[key], float) and r[key] == r[key], key
  assert records[-1]["tokens_per_sec"] > 0 and records[0]["learning_rate"] == 0.0
  # Training loss per language (tags carried through packing): the batch loss is their
  # token-weighted mean, so it lies between the smallest and the largest.
  for r in records:
    per_language = [v for k, v in r.items() if k.startswith("loss/")]
    assert per_language
    assert min(per_language) - 1e-5 <= r["loss"] <= max(per_language) + 1e-5
  assert len({k for r in records for k in r if k.startswith("loss/")}) >= 3
  # TensorBoard's event files hold the same scalars (read as TensorBoard reads them).
  import tensorflow as tf

  scalars: dict[str, dict[int, float]] = {}
  for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in records})
  assert "TrainerConfig.num_steps = 6" in (tmp_path / "config.gin").read_text()
  assert "model_config.preset = 'tiny'" in (tmp_path / "operative_config.gin").read_text()
  assert int(result["state"].step) == 6


def test_rerunning_a_finished_run_says_so_and_builds_nothing(short_run, caplog):
  _, workdir = short_run
  before = (workdir / "metrics.jsonl").read_text()
  with caplog.at_level("INFO"):
    result = cli.main(
      [
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={workdir}",
        *[f"--gin_bindings={b}" for b in SHORT],
      ]
    )
  assert result["complete_at"] == 6 and result["state"] is None
  assert f"{workdir} is complete: its checkpoint of step 6 reaches" in caplog.text
  assert "--start_over" in caplog.text and "mesh" not in caplog.text  # nothing was built
  assert (workdir / "metrics.jsonl").read_text() == before


def test_same_config_and_seed_give_the_same_losses(short_run, tmp_path):
  runs = [_losses(short_run[1])]
  cli.main(
    [
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={tmp_path / 'b'}",
      *[f"--gin_bindings={b}" for b in SHORT],
    ]
  )
  runs.append(_losses(tmp_path / "b"))
  assert runs[0] == runs[1]
  cli.main(
    [
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={tmp_path / 'c'}",
      *[f"--gin_bindings={b}" for b in SHORT],
      "--gin_bindings=DataConfig.seed = 7",
    ]
  )
  assert _losses(tmp_path / "c") != runs[0]


def test_start_up_errors_name_what_is_wrong(tmp_path):
  with pytest.raises(SystemExit, match="--gin_file=nope.gin: no such file"):
    cli.main(["--gin_file=nope.gin", f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit, match="num_stepz"):
    cli.main(
      [
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={tmp_path}",
        "--gin_bindings=TrainerConfig.num_stepz = 3",
      ]
    )
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  for workdir in (blocker, blocker / "run"):
    with pytest.raises(SystemExit, match=f"--workdir={workdir}: {blocker} is a file, not a dir"):
      cli.main(["--gin_file=gin_configs/quickstart.gin", f"--workdir={workdir}"])
  readonly = tmp_path / "readonly"
  readonly.mkdir(mode=0o555)
  if os.geteuid() != 0:  # root writes anywhere
    with pytest.raises(SystemExit, match=f"--workdir={readonly}/run is not writable"):
      cli.main(["--gin_file=gin_configs/quickstart.gin", f"--workdir={readonly}/run"])
  with pytest.raises(SystemExit, match="seq_len=256 exceeds the model's max_length=128"):
    cli.main(
      [
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={tmp_path}",
        "--gin_bindings=DataConfig.seq_len = 256",
      ]
    )
  with pytest.raises(SystemExit, match="tokenizer has 4096 ids but ModelConfig.vocab_size=1024"):
    cli.main(
      [
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={tmp_path}",
        "--gin_bindings=model_config.overrides = {'vocab_size': 1024}",
      ]
    )


def test_held_out_loss_is_logged_per_language(tmp_path, caplog):
  with caplog.at_level("INFO"):
    cli.main(
      [
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={tmp_path}",
        *[f"--gin_bindings={b}" for b in ALL_LANGUAGES],
        "--gin_bindings=TrainerConfig.eval_every = 3",
      ]
    )
  # Before the first step: what the compiled step needs per device (memory_report.py).
  assert "train step per device on 8 x cpu:" in caplog.text
  assert "peak" in caplog.text and "arithmetic intensity" in caplog.text
  assert "model FLOPs" in caplog.text
  records = [
    json.loads(line) for line in (tmp_path / "eval_metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [3, 6]
  from polylm_jax.data import sample

  for r in records:
    assert sorted(k.split("/")[1] for k in r if k.startswith("val_loss/")) == sorted(
      sample.LANGUAGES
    )
    assert sorted(k for k in r if k.startswith("val_bpb/")) == sorted(
      f"val_bpb/{lang}" for lang in sample.LANGUAGES
    )
    assert all(5.0 < r[f"val_loss/{lang}"] < 9.0 for lang in sample.LANGUAGES)
  assert records[1]["val_loss/en"] < records[0]["val_loss/en"]  # still learning
  # Bits per byte: the same held-out tokens' NLL in bits over their text's UTF-8 bytes, counted
  # here by decoding each document's targets (not through the trainer's per-token table).
  import math

  from polylm_jax.data import pipeline, tasks
  from polylm_jax.data import tokenizer as tok

  sp = tok.load(sample.TOKENIZER_MODEL)
  config = pipeline.DataConfig(
    mixture=tasks.TASK_PREFIX + "th", split="validation", seq_len=64, batch_size=8
  )
  tokens = text_bytes = 0
  for batch in pipeline.eval_batches(config):
    for targets, weights, segments in zip(batch["targets"], batch["weights"], batch["segment_ids"]):
      tokens += int(weights.sum())
      for seg in set(segments[weights > 0].tolist()):
        ids = [t for t in targets[(segments == seg) & (weights > 0)].tolist() if t != 2]
        text_bytes += len(sp.decode(ids).encode("utf-8"))
  expected = records[1]["val_loss/th"] * tokens / math.log(2) / text_bytes
  assert records[1]["val_bpb/th"] == pytest.approx(expected, rel=1e-5)


def test_your_own_corpora_from_gin(tmp_path):
  """JSONL and parallel files registered from gin alone, trained on through a curriculum."""
  from polylm_jax.data import sample

  th, en = sample.sample_lines("th", "train"), sample.sample_lines("en", "train")
  (tmp_path / "th.jsonl").write_text(
    "\n".join(json.dumps({"content": t, "score": 0.9}, ensure_ascii=False) for t in th), "utf-8"
  )
  (tmp_path / "para.en").write_text("\n".join(en), "utf-8")
  (tmp_path / "para.th").write_text("\n".join(th), "utf-8")
  (tmp_path / "mine.gin").write_text(f"""
include 'quickstart.gin'
train.corpora = @TextCorpora()
TextCorpora.files = {{'th': {{'train': '{tmp_path}/*.jsonl'}}}}
TextCorpora.record_format = 'jsonl'
TextCorpora.text_field = 'content'
TextCorpora.lang_score_field = 'score'
TextCorpora.min_lang_score = 0.5
TextCorpora.prefix = 'mydata_'
train.bitext = @BitextCorpora()
BitextCorpora.pairs = {{'en-th': {{'train': ['{tmp_path}/para.en', '{tmp_path}/para.th']}}}}
BitextCorpora.prefix = 'mybitext_'
Curriculum.stages = [@only/Stage()]
only/Stage.rates = {{'mydata_th': 0.5, 'mybitext_en_th': 0.3, 'en': 0.2}}
""")
  cli.main(
    [
      f"--gin_file={tmp_path / 'mine.gin'}",
      f"--workdir={tmp_path / 'run'}",
      *[f"--gin_bindings={b}" for b in SHORT],
    ]
  )
  records = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  assert len(records) == 6
  seen = {k for r in records for k in r if k.startswith("loss/")}
  assert seen <= {"loss/th", "loss/en"} and "loss/th" in seen


def test_gin_errors_name_the_missing_setting_and_the_closest_names():
  from polylm_jax.errors import ConfigError
  from polylm_jax.train import gin_setup

  gin_setup.register_configurables()
  with pytest.raises(ConfigError, match="did you mean 'num_steps'"):
    gin_setup.parse_gin(["quickstart.gin"], ["TrainerConfig.num_step = 3"])
  with pytest.raises(ConfigError, match="did you mean 'TrainerConfig'"):
    gin_setup.parse_gin(["quickstart.gin"], ["TrainerConfg.num_steps = 3"])
  with pytest.raises(ConfigError, match=r"set DataConfig.mixture in your gin file .*"):
    gin_setup.parse_gin(["quickstart.gin"], ["DataConfig.mixture = %gin.REQUIRED"])


def test_train_tokenizer_chooses_the_vocabulary_and_a_change_on_resume_is_refused(tmp_path):
  """`train.tokenizer`: every task tokenizes with it, the checkpoint records it (so exports and
  generation use it), and resuming with another one is a data-setting change, named."""
  import base64

  from polylm_jax.data import sample
  from polylm_jax.data import tokenizer as tok
  from polylm_jax.errors import CheckpointMismatchError

  small, other = (
    tok.train({lang: sample.sample_lines(lang) for lang in langs}, tmp_path / f"{name}.model", 1024)
    for name, langs in (("small", ("en", "de", "th")), ("other", ("en", "ru")))
  )
  args = [
    "--gin_file=gin_configs/quickstart.gin",
    f"--workdir={tmp_path / 'run'}",
    *[f"--gin_bindings={b}" for b in SHORT],
    f"--gin_bindings=train.tokenizer = '{small}'",
    "--gin_bindings=model_config.overrides = {'vocab_size': 1024}",
  ]
  cli.main(args)
  meta = json.loads((tmp_path / "run" / "checkpoints" / "6" / "meta" / "metadata").read_text())
  assert base64.b64decode(meta["tokenizer_model_b64"]) == pathlib.Path(small).read_bytes()
  with pytest.raises(CheckpointMismatchError, match="train.tokenizer: checkpoint 'SentencePiece"):
    cli.main(
      [a.replace(small, other) for a in args] + ["--gin_bindings=TrainerConfig.num_steps = 8"]
    )
  with pytest.raises(SystemExit, match=r"train.tokenizer = '/nonexistent.model': no such file"):
    cli.main(args[:2] + ["--gin_bindings=train.tokenizer = '/nonexistent.model'"])
