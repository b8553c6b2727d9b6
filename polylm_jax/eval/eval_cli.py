"""`polylm-eval`: PolyLM's multilingual benchmarks for one checkpoint, in one command, offline.

  polylm-eval run --workdir=RUN --out=eval/step20000            # the whole suite, zero-shot
  polylm-eval run --hf_dir=hf/model --tasks=xnli,xcopa --num_fewshot=5 --out=eval/hf
  polylm-eval run --workdir=RUN --tasks=wmt20,flores --out=eval/translation
  polylm-eval compare eval/stage1 eval/final --labels=stage1,final --out=eval/stage_switch
  polylm-eval fetch --tasks=xnli,xcopa --languages=th,vi --data_dir=/data/hf   (needs network)

Families: the paper's xnli, xcopa, pawsx, xwinograd, xstorycloze, tydiqa (the default) and wmt20;
flores (FLORES-200, every language with English); belebele, mgsm, mlqa, global_mmlu. Sets:
translation (wmt20 + flores), paper, modern. heldout: bits per byte of held-out text.

`run` writes <out>/results.json, results.md (family x language, with averages), one PNG chart per
family, and <out>/tasks/<task>.json per finished task (an interrupted run, started again with the
same --out, reuses those). Data comes from the Hugging Face datasets cache (`--data_dir` points at
one filled on a machine with network by `fetch`); nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

from polylm_jax import console
from polylm_jax.decode import generate_cli
from polylm_jax.errors import MissingDataError
from polylm_jax.io import storage


def _offline(data_dir: str | None, *, offline: bool = True) -> None:
  if data_dir:
    os.environ["HF_HOME"] = str(pathlib.Path(data_dir).absolute())
    os.environ.pop("HF_DATASETS_CACHE", None)
    # WMT20's files (eval/translation.py) live in the data directory too: sacreBLEU fetches them
    # there (it reads $SACREBLEU once, when first imported: this runs before that).
    os.environ["SACREBLEU"] = str(pathlib.Path(data_dir).absolute() / "sacrebleu")
  if offline:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def _split(text: str | None) -> list[str]:
  return [x.strip() for x in (text or "").split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="polylm-eval",
    description=console.summary(__doc__),
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="evaluate one model")
  src = run.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training workdir (newest checkpoint unless --step)")
  src.add_argument("--checkpoint", help="a checkpoint step directory")
  src.add_argument("--hf_dir", help="an exported Hugging Face directory")
  run.add_argument("--step", type=int, default=None)
  run.add_argument("--out", required=True, help="results directory")
  for p in (run,):
    p.add_argument(
      "--tasks",
      default=",".join(_families() + ["heldout"]),
      help="families, sets (see above) and/or lm-eval task names, comma-separated (default: "
      "the paper's understanding and QA families and heldout)",
    )
    p.add_argument(
      "--languages",
      default=None,
      help="language codes to keep (default: the languages the model was trained on)",
    )
  run.add_argument(
    "--heldout",
    default="sample",
    help="the heldout family's text: 'sample' (the embedded corpus's validation split) or a "
    "directory of <lang>.txt files, one document per line",
  )
  run.add_argument("--num_fewshot", type=int, default=0)
  run.add_argument(
    "--chat",
    action="store_true",
    help="an instruction-tuned model: wrap every request in the instruction format it was "
    "trained with (its checkpoint's, or its export's chat template); few-shot examples become "
    "earlier turns",
  )
  run.add_argument("--limit", type=int, default=None, help="documents per task (for a quick look)")
  run.add_argument("--batch_size", type=int, default=16)
  run.add_argument("--mesh", default="", help="data,fsdp,tensor sizes, e.g. 1,1,8")
  run.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  generate_cli.add_layout_flag(run)
  run.add_argument(
    "--include_path", default=None, help="a directory of your own lm-eval task YAMLs"
  )
  run.add_argument(
    "--data_dir",
    default=None,
    help="a Hugging Face cache directory (HF_HOME) filled by `polylm-eval fetch`",
  )
  compare = sub.add_parser("compare", help="two or more result directories side by side")
  compare.add_argument("runs", nargs="+")
  compare.add_argument("--labels", default=None, help="comma-separated, one per run")
  compare.add_argument("--out", required=True)
  fetch = sub.add_parser("fetch", help="download the suite's data into a cache (needs network)")
  fetch.add_argument("--tasks", default=",".join(_families()))
  fetch.add_argument("--languages", default=None)
  fetch.add_argument("--data_dir", required=True)
  return parser


def _families() -> list[str]:
  from polylm_jax.eval.suite import DEFAULT

  return list(DEFAULT)


def _languages(args, meta: dict) -> list[str]:
  if args.languages:
    return _split(args.languages)
  from polylm_jax import languages

  return list(meta.get("languages") or languages.DEFAULT_CODES)


def write_report(out: str, runs: list[dict], labels: list[str]) -> None:
  from polylm_jax.eval import report

  storage.write_text(storage.join(out, "results.md"), report.markdown(runs, labels))
  report.charts(runs, labels, out)


# What a training workdir or an export holds: an evaluation's --out is never one of them.
_NOT_AN_EVAL_DIR = ("checkpoints", "data_state", "metrics.jsonl", "LOCK", "config.json")


def check_out(out: str) -> None:
  """Results go to a directory of their own, never into a training workdir or an export."""
  found = [n for n in _NOT_AN_EVAL_DIR if storage.exists(storage.join(out, n))]
  if found:
    what = "an export" if found == ["config.json"] else "a training workdir"
    raise ValueError(
      f"--out={out} is {what} (it holds {', '.join(found)}); give the results a directory of "
      f"their own, e.g. --out=eval/{storage.name(out) or 'run'}"
    )


def _run(args) -> int:
  check_out(args.out)
  names = _split(args.tasks)
  from polylm_jax.eval import heldout

  wants_heldout = heldout.FAMILY in names
  names = [n for n in names if n != heldout.FAMILY]
  if wants_heldout:
    heldout.check_source(args.heldout)
  _offline(args.data_dir)
  import jax
  import lm_eval.tasks  # noqa: F401  (it gives huggingface_hub's logger a handler: tidied next)

  console.one_handler_each("huggingface_hub")

  from polylm_jax.decode import loading
  from polylm_jax.eval import lm_eval_model, suite

  # Everything that can be wrong with the model's identity, the results directory or the tasks'
  # data is found from the model's metadata, before its parameters are read.
  source, meta = loading.peek(
    workdir=args.workdir, step=args.step, checkpoint=args.checkpoint, hf_dir=args.hf_dir
  )
  fmt = None
  if args.chat:
    template = loading.export_chat_template(args.hf_dir) if args.hf_dir else ""
    fmt = loading.check_chat(source, meta, template)
  out = args.out
  run_info = _run_info(args, source, meta)
  languages = _languages(args, meta)
  manager, specs, tasks = None, [], {}
  if names:
    manager = suite.task_manager(args.include_path)
    specs = suite.resolve(names, languages, set(manager.all_tasks))
    tasks = suite.load_tasks(
      [s for s in specs if not storage.exists(suite.task_record(out, s.task))], manager
    )
  docs = heldout.documents(args.heldout, languages) if wants_heldout else {}
  if wants_heldout and not docs:
    logging.warning(
      "heldout: --heldout=%s has no text in the model's languages (%s); skipped",
      args.heldout,
      ", ".join(languages),
    )
  if not specs and not docs:
    raise ValueError("no task left to run (check --tasks and --languages)")
  mesh, loaded = loading.load_to_run(
    mesh=args.mesh,
    dtype=args.dtype,
    workdir=args.workdir,
    # The step peeked at (checkpoints/<step>), even if a newer checkpoint has come since.
    step=int(storage.name(source)) if args.workdir else args.step,
    checkpoint=args.checkpoint,
    hf_dir=args.hf_dir,
  )
  storage.makedirs(out)
  storage.write_text(storage.join(out, "run.json"), json.dumps(run_info, indent=2))
  lm = lm_eval_model.PolyLMJax.from_parts(
    loaded.config,
    loaded.params,
    loaded.tokenizer(),
    mesh=mesh,
    framing=loaded.framing,
    batch_size=args.batch_size,
    decode_layout=args.decode_layout,
    instruction_format=fmt,
  )
  loaded.params = None  # the model holds its own layout: the loaded arrays need not stay alive
  speed = lm.measure_speed() if tasks else None
  records = suite.run_suite(
    lm,
    specs,
    tasks,
    out,
    num_fewshot=args.num_fewshot,
    limit=args.limit,
    requests_per_second=speed,
    task_manager=manager,
    chat=args.chat,
  )
  records.update(_heldout(lm, docs, out))
  storage.write_text(
    storage.join(out, "results.json"), json.dumps(dict(run_info, tasks=records), indent=2)
  )
  write_report(out, [records], [storage.name(loaded.source)])
  print(storage.read_text(storage.join(out, "results.md")))
  logging.info("results in %s (devices: %d %s)", out, mesh.devices.size, jax.devices()[0].platform)
  return 0


def _run_info(args, source: str, meta: dict) -> dict:
  """What identifies an evaluation (model, step, shots, limit, chat); an --out holding another's
  results is refused."""
  run_info = {
    "model": source,
    "step": meta.get("step"),
    "num_fewshot": args.num_fewshot,
    "limit": args.limit,
  }
  if args.chat:
    run_info["chat"] = True
  previous = storage.join(args.out, "run.json")
  if storage.exists(previous) and json.loads(storage.read_text(previous)) != run_info:
    raise ValueError(
      f"--out={args.out} holds results of another evaluation "
      f"({json.loads(storage.read_text(previous))}); choose another --out"
    )
  return run_info


def _heldout(lm, docs: dict[str, list[str]], out: str) -> dict[str, dict]:
  """Bits per byte per language (eval/heldout.py); finished languages are reused."""
  from polylm_jax.eval import heldout, suite

  records = {}
  for lang, texts in docs.items():
    path = suite.task_record(out, heldout.task_name(lang))
    if not storage.exists(path):
      record = heldout.evaluate(lm.scorer, lm.sp, {lang: texts})[heldout.task_name(lang)]
      storage.write_text(path, json.dumps(record, indent=2))
      logging.info("heldout: %s bits per byte = %.4f", lang, record["value"])
    records[heldout.task_name(lang)] = json.loads(storage.read_text(path))
  return records


def _compare(args) -> int:
  runs, labels = [], _split(args.labels) or [storage.name(r) for r in args.runs]
  if len(labels) != len(args.runs):
    raise ValueError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
  for run in args.runs:
    path = storage.join(run, "results.json")
    if not storage.exists(path):
      raise FileNotFoundError(f"{run}: no results.json (run `polylm-eval run --out={run}` first)")
    runs.append(json.loads(storage.read_text(path))["tasks"])
  storage.makedirs(args.out)
  write_report(args.out, runs, labels)
  print(storage.read_text(storage.join(args.out, "results.md")))
  return 0


def _hub_resolves() -> None:
  """Without network, `fetch` fails at once, not after the Hub client's five retries per file.
  Only a name that does not resolve counts, and only without a proxy (which resolves for us)."""
  import socket
  import urllib.parse

  endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
  if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return
  host = urllib.parse.urlparse(endpoint).hostname or endpoint
  try:
    socket.getaddrinfo(host, 443)
  except OSError as e:
    raise MissingDataError(
      f"fetch needs network access to the Hugging Face Hub, but {host} does not resolve ({e}); "
      f"nothing was fetched (HF_ENDPOINT chooses a mirror, HTTPS_PROXY a proxy)"
    ) from e


def _fetch(args) -> int:
  _offline(args.data_dir, offline=False)
  from polylm_jax import languages
  from polylm_jax.eval import suite, translation

  names = _split(args.tasks)
  if not suite.shipped_only(names):
    _hub_resolves()  # before indexing lm-eval's tasks: without network, fail at once
  import lm_eval.tasks  # noqa: F401  (it gives huggingface_hub's logger a handler: tidied next)

  console.one_handler_each("huggingface_hub")
  manager = suite.task_manager()
  specs = suite.resolve(
    names, _split(args.languages) or list(languages.DEFAULT_CODES), set(manager.all_tasks)
  )
  # The shipped translation tasks' files (FLORES-200's release, sacreBLEU's WMT20), then every
  # task loaded once: for the Hub's datasets that is the download.
  translation.fetch([s.task for s in specs])
  suite.load_tasks(specs, manager, fetching=True)
  print(f"fetched {len(specs)} task(s) into {args.data_dir}")
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  console.quiet_logging()  # Orbax and absl INFO lines stay out of the console
  console.choose_platform()  # no failed TPU probe on a machine without one
  try:
    return {"run": _run, "compare": _compare, "fetch": _fetch}[args.command](args)
  except (ValueError, FileNotFoundError) as e:
    print(f"polylm-eval: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:  # errors.MissingDataError and friends
    print(f"polylm-eval: {e}", file=sys.stderr)
    return 2


def console_main() -> None:
  sys.exit(main())
