"""`python -m polylm_jax.train` / `polylm-train`: parse gin, check the setup, run the loop.

Everything a run does is gin: `train.model`, `train.optimizer`, `train.mesh`, `train.data`,
`train.trainer` (see gin_configs/). A run writes to its workdir: checkpoints/ and data_state/
(resumable state), metrics.jsonl and eval_metrics.jsonl, tensorboard/, config.gin (the gin config
of the latest start, written once start-up succeeded) and operative_config.gin (every setting the
run used, written when it finishes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import pathlib
import sys
import uuid

import gin

from polylm_jax import config as model_configs
from polylm_jax import console, files, sharding
from polylm_jax import languages as language_sets
from polylm_jax.train import loop
from polylm_jax.train.checkpoint import CheckpointConfig, tokenizer_b64
from polylm_jax.train.optimizer import OptimizerConfig
from polylm_jax.train.spikes import SpikeConfig

# The shipped gin files, inside the package (also a non-editable install or a wheel has them).
GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"

_train_fn = None  # `run` as wrapped by gin


def register_configurables() -> None:
  """Makes the config dataclasses gin-configurable without gin in the library modules."""
  global _train_fn
  if _train_fn is not None:
    return
  from polylm_jax.data.curriculum import Curriculum, Stage
  from polylm_jax.data.pipeline import DataConfig
  gin.external_configurable(model_configs.model_config, "model_config")
  gin.external_configurable(OptimizerConfig, "OptimizerConfig")
  gin.external_configurable(sharding.MeshConfig, "MeshConfig")
  gin.external_configurable(DataConfig, "DataConfig")
  gin.external_configurable(Curriculum, "Curriculum")
  gin.external_configurable(Stage, "Stage")
  from polylm_jax.data.sources import BitextCorpora, TextCorpora
  from polylm_jax.data.instructions import InstructionCorpora
  from polylm_jax import chat
  gin.external_configurable(InstructionCorpora, "InstructionCorpora")
  gin.external_configurable(chat.InstructionFormat, "InstructionFormat")
  gin.external_configurable(TextCorpora, "TextCorpora")
  gin.external_configurable(BitextCorpora, "BitextCorpora")
  gin.external_configurable(loop.TrainerConfig, "TrainerConfig")
  gin.external_configurable(CheckpointConfig, "CheckpointConfig")
  gin.external_configurable(SpikeConfig, "SpikeConfig")
  gin.external_configurable(language_sets.Languages, "Languages")
  _train_fn = gin.external_configurable(run, "train")


def check_workdir(workdir: str) -> pathlib.Path:
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise SystemExit(f"--workdir={workdir} is not writable: {e}") from e
  return path


def parse_gin(gin_files: list[str], bindings: list[str]) -> None:
  for f in gin_files:
    if not pathlib.Path(f).is_file() and not (GIN_DIR / f).is_file():
      raise SystemExit(f"--gin_file={f}: no such file (looked in the current directory and "
                       f"{GIN_DIR})")
  gin.clear_config()  # one run per parse: bindings never leak between in-process runs
  gin.add_config_file_search_path(str(GIN_DIR))
  for f in gin_files:
    gin.add_config_file_search_path(str(pathlib.Path(f).resolve().parent))
  try:
    gin.parse_config_files_and_bindings(
        [f if pathlib.Path(f).is_file() else str(GIN_DIR / f) for f in gin_files], bindings)
  except (ValueError, KeyError, IOError, SyntaxError) as e:
    hint = (" (set it in your gin file or with --gin_bindings, e.g. "
            "--gin_bindings='TrainerConfig.num_steps = 1000')" if "gin.REQUIRED" in str(e) else "")
    raise SystemExit(f"gin configuration error: {e}{hint}") from e


def run(workdir: str, model=gin.REQUIRED, optimizer=gin.REQUIRED, mesh=gin.REQUIRED,
        data=gin.REQUIRED, trainer=gin.REQUIRED, checkpoint=CheckpointConfig(),
        spikes=SpikeConfig(), curriculum=None, corpora=None, bitext=None, start_over=False,
        languages=None, instructions=None, epochs=None):
  """The gin entry point: wires the seqio pipeline to the training loop."""
  # The run's language set first: tags, loss slots and curricula all ask languages.active().
  language_sets.set_active(languages or language_sets.Languages())
  import jax
  import seqio
  from polylm_jax.data import pipeline, tasks  # noqa: F401 (registers the sample tasks)

  # Settings that need nothing built are checked first.
  if data.seq_len > model.max_length:
    raise SystemExit(f"DataConfig.seq_len={data.seq_len} exceeds the model's max_length="
                     f"{model.max_length}")
  if epochs is None:
    _check_schedule(optimizer, trainer.num_steps)
  for registry in (corpora, bitext):  # TextCorpora, BitextCorpora: before anything names a task
    if registry is not None:
      registry.register()
  instruction_meta = {}
  if instructions is not None:  # instruction tuning (data/instructions.py)
    stats = instructions.register(tasks.vocabulary(), data.seq_len)
    instruction_meta = {"instruction_format": instructions.format.to_meta()}
    if epochs is not None:
      from polylm_jax.data.instructions import steps_for_epochs
      steps = steps_for_epochs(stats, epochs, data.batch_size)
      logging.info("train.epochs = %s: %d steps of %d rows", epochs, steps, data.batch_size)
      trainer = dataclasses.replace(trainer, num_steps=steps)
      _check_schedule(optimizer, trainer.num_steps)
  elif epochs is not None:
    raise SystemExit("train.epochs needs instruction data (train.instructions); for "
                     "pre-training set TrainerConfig.num_steps")
  vocab = tasks.vocabulary()
  if vocab.vocab_size > model.vocab_size:
    raise SystemExit(f"the tokenizer has {vocab.vocab_size} ids but ModelConfig.vocab_size="
                     f"{model.vocab_size} ({model.name}); enlarge the model vocabulary")
  if curriculum is not None:
    logging.info("curriculum (DataConfig.mixture=%r is not used):\n%s", data.mixture,
                 curriculum.table(data.split))
    batches = pipeline.StagedBatches(curriculum, data, shard_index=jax.process_index(),
                                     num_shards=jax.process_count())
    names = batches.mixtures
  else:
    batches = pipeline.BatchIterator(data, shard_index=jax.process_index(),
                                     num_shards=jax.process_count())
    names = [data.mixture]
  pipeline.check_has_data(names, data)
  eval_sets = None
  if trainer.eval_every:
    # Held-out loss per language: the validation split of every task the run trains on.
    task_names = sorted({t.name for n in names for t, _ in pipeline.mixture_tasks(n)})
    eval_sets = {tasks.task_language(t): pipeline.eval_batches(
        dataclasses.replace(data, mixture=t, split="validation"),
        shard_index=jax.process_index(), num_shards=jax.process_count()) for t in task_names
        if "validation" in seqio.get_mixture_or_task(t).splits}
  metadata = {"gin_config": gin.config_str(), "tokenizer_model_b64": tokenizer_b64(
      vocab.sentencepiece_model_file), "data_config": dataclasses.asdict(data),
              **instruction_meta}
  benchmark = None
  if trainer.lm_eval_tasks:
    from polylm_jax.eval.in_training import Benchmark
    benchmark = Benchmark(trainer.lm_eval_tasks,
                          pathlib.Path(vocab.sentencepiece_model_file).read_bytes(),
                          limit=trainer.lm_eval_limit, num_fewshot=trainer.lm_eval_num_fewshot,
                          include_path=trainer.lm_eval_include_path,
                          languages=language_sets.active().codes)
  result = loop.train(model, optimizer, mesh, trainer, batches, workdir, checkpoint=checkpoint,
                      spikes=spikes, metadata=metadata, eval_sets=eval_sets,
                      start_over=start_over, benchmark=benchmark)
  from polylm_jax.data import sources
  for task, counts in sources.dropped_records().items():
    logging.warning("data: task %s dropped records %s", task, counts)
  return result


def _check_schedule(optimizer, num_steps: int) -> None:
  from polylm_jax.train.optimizer import lr_schedule
  try:
    lr_schedule(optimizer, num_steps)
  except ValueError as e:
    raise SystemExit(str(e)) from e


def _not_gin_path_noise(record: logging.LogRecord) -> bool:
  # gin looks for an include in package resources before its search path and logs an ERROR when
  # it is not there, though the include is then found: drop that misleading line (gin logs it
  # through the root logger, absl's handlers through "absl").
  # ... and an INFO line per include it finds ("system_path_file_exists").
  return not (record.pathname.endswith("resource_reader.py") and (
      "Path not found" in str(record.msg) or "system_path_file_exists" in str(record.msg)))


def quiet_logging() -> None:
  """One console handler on the root logger (replacing plain stream handlers that imported
  libraries installed; handlers of other kinds, e.g. a test's log capture, stay)."""
  root = logging.getLogger()
  for handler in list(root.handlers):
    if type(handler) is logging.StreamHandler:  # noqa: E721 (exactly the plain console handler)
      root.removeHandler(handler)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  handler.addFilter(_not_gin_path_noise)
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # seqio logs every task it opens at INFO
  for logger in (root, logging.getLogger("absl")):
    for noise in (_not_gin_path_noise, console.quiet_seqio):
      if noise not in logger.filters:
        logger.addFilter(noise)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before tensorflow is first imported


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="polylm-train", description=__doc__)
  parser.add_argument("--gin_file", action="append", default=[], required=True,
                      help="gin file (repeatable); relative paths also resolve under gin_configs/")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding such as 'TrainerConfig.num_steps = 10' (repeatable)")
  parser.add_argument("--workdir", required=True,
                      help="where checkpoints, metrics, TensorBoard events and config.gin go; a "
                           "workdir with checkpoints is resumed")
  parser.add_argument("--start_over", action="store_true",
                      help="begin a new run in a workdir that has checkpoints: the earlier run's "
                           "files are moved to <workdir>/previous/<time>/ (nothing is deleted)")
  parser.add_argument("--distributed", action="store_true",
                      help="multi-host: call jax.distributed.initialize() first (auto-detected on "
                           "TPU pods and SLURM; else pass the three flags below)")
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args = parser.parse_args(argv)
  quiet_logging()
  console.choose_platform()
  if args.distributed:
    import jax
    # CPU processes need a collectives backend to talk to each other; GPU/TPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  workdir = check_workdir(args.workdir)
  register_configurables()
  parse_gin(args.gin_file, args.gin_bindings)
  import jax
  lead = jax.process_index() == 0  # one writer per run, whatever the number of hosts
  # Taken before anything is built, so a second trainer on this workdir stops at once.
  with files.WorkdirLock(workdir) if lead else contextlib.nullcontext():
    result = _train_fn(workdir=str(workdir), start_over=args.start_over)
    if lead:
      files.atomic_write_text(workdir / "operative_config.gin", gin.operative_config_str())
  return result


def console_main() -> None:
  """Exit status 0 on success; otherwise the error is the last thing printed and the status is 1
  (2 for a configuration error found at start). The process exits without waiting for the data
  pipeline's threads, which would otherwise abort it ("terminate called ...", status 134)."""
  try:
    main(sys.argv[1:])
  except SystemExit as e:
    if e.code in (None, 0):
      raise
    _die(f"polylm-train: {e.code}" if isinstance(e.code, str) else None,
         e.code if isinstance(e.code, int) else 2)
  except KeyboardInterrupt:
    _die("polylm-train: interrupted", 130)
  except BaseException as e:  # noqa: BLE001 (everything else: report it, then exit 1)
    logging.error("training failed", exc_info=True)
    # gin appends "In call to configurable ..." lines; the message itself names the setting.
    text = " ".join(l.strip() for l in str(e).splitlines()
                    if not l.strip().startswith("In call to configurable"))
    _die(f"polylm-train: error: {type(e).__name__}: {text}", 1)


def _die(message: str | None, code: int) -> None:
  logging.shutdown()
  sys.stdout.flush()
  if message:
    print(message, file=sys.stderr, flush=True)
  os._exit(code)
