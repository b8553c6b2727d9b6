"""`polylm-cache`: tokenize and pack the corpora of a training gin file once, with Apache Beam.

    polylm-cache --gin_file=my_run.gin --cache_dir=/data/cache [--tasks='mydata_.*']
        [--beam_option=--runner=DataflowRunner --beam_option=--project=...]

The gin file is the one training uses: its `train.corpora = @TextCorpora()` (with
`TextCorpora.cache_seq_len` set) and `train.bitext` are registered, every cacheable task matching
`--tasks` is cached, and training then reads them with `DataConfig.use_cached = True` and
`DataConfig.cache_dirs = ['/data/cache']`. Without --beam_option, Beam's DirectRunner runs here.
"""

from __future__ import annotations

import argparse
import logging
import sys

from polylm_jax import console
from polylm_jax.errors import ConfigError


def main(argv: list[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(prog="polylm-cache", description=console.summary(__doc__))
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--cache_dir", required=True, help="local, gs://, ... (tf.io.gfile)")
  parser.add_argument("--tasks", default=".*", help="regex over registered cacheable task names")
  parser.add_argument(
    "--beam_option",
    action="append",
    default=[],
    help="a Beam pipeline option, e.g. --runner=SparkRunner (repeatable)",
  )
  args = parser.parse_args(argv)
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
  )
  try:
    import apache_beam  # noqa: F401
  except ImportError as e:
    raise SystemExit("polylm-cache needs Apache Beam: pip install apache-beam") from e

  from polylm_jax import languages
  from polylm_jax.data import cache, tasks  # noqa: F401 (registers the sample tasks)
  from polylm_jax.train import gin_setup

  gin_setup.register_configurables()
  try:
    gin_setup.parse_gin(args.gin_file, args.gin_bindings)
  except ConfigError as e:
    raise SystemExit(str(e)) from e
  # The run's language set: cached rows carry its per-token language tags. The tasks hold it in
  # their preprocessors, so Beam workers on other machines tag with it too.
  language_set = gin_setup.configured("train.languages", languages.DEFAULT)
  for key in ("train.corpora", "train.bitext"):
    registry = gin_setup.configured(key)
    if registry is not None:
      registry.register(language_set=language_set)
  names = cache.select_tasks(args.tasks)
  written = cache.cache_tasks(names, args.cache_dir, args.beam_option)
  for path in written:
    print(path)
  return written


def console_main() -> None:
  main(sys.argv[1:])


if __name__ == "__main__":
  console_main()
