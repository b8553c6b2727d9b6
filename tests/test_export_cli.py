"""polylm-export from a training workdir and polylm-import into a training start, end to end."""

import json
import os

import jax
import numpy as np
import pytest
import runs
import torch
import transformers
from runs import train_args

from polylm_jax.checkpoint import on_disk
from polylm_jax.config import PRESETS
from polylm_jax.errors import CheckpointMismatchError
from polylm_jax.export import export_cli, hf_export, hf_layout, import_cli
from polylm_jax.train import train_cli

SHORT = {**runs.SHORT, "TrainerConfig.num_steps": 6, "TrainerConfig.eval_every": 0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  train_cli.main(train_args(workdir, SHORT))
  return workdir


def _readable_by_others(out):
  """A server running as another user can read the output (0755 directories, 0644 files under
  the usual umask 022)."""
  umask = os.umask(0o022)
  os.umask(umask)
  for path in [out, *out.rglob("*")]:
    want = (0o777 if path.is_dir() else 0o666) & ~umask
    assert path.stat().st_mode & 0o777 == want, path


def test_export_from_workdir_verifies_and_describes_itself(run_dir, tmp_path, capsys):
  out = tmp_path / "hf"
  assert export_cli.main([f"--workdir={run_dir}", f"--out={out}", "--verify"]) == 0
  printed = capsys.readouterr().out
  assert "PASS tokenizer" in printed and "PASS logits" in printed and "verify: PASS" in printed
  _readable_by_others(out)
  for name in (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "README.md",
  ):
    assert (out / name).is_file(), name
  card = (out / "README.md").read_text()
  assert "training steps: 6" in card and "tokens seen" in card
  # The curriculum that fed the run, stage by stage (not DataConfig.mixture, which it replaced).
  provenance = card.split("## Training configuration")[0]
  assert "a language curriculum of 2 stage(s)" in provenance
  assert "stage 1 'final' from step 300: non-English 60.0%" in provenance
  assert "polylm_sample" not in provenance
  tok = transformers.AutoTokenizer.from_pretrained(out)
  # BOS first, as training framed every document (framing.py); no EOS.
  ids = tok("hello")["input_ids"]
  assert tok.eos_token_id == 2 and ids[0] == 1 and ids[1:] == reader_ids("hello", out)
  # Existing output: refused without --overwrite.
  assert export_cli.main([f"--workdir={run_dir}", f"--out={out}"]) == 2
  assert "pass overwrite" in capsys.readouterr().err


def reader_ids(text, out):
  import sentencepiece as spm

  return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).encode(text)


def test_sharded_bf16_export_and_exact_round_trip(run_dir, tmp_path):
  out = tmp_path / "bf16"
  assert (
    export_cli.main(
      [
        f"--workdir={run_dir}",
        f"--out={out}",
        "--dtype=bfloat16",
        "--max_shard_size=100KB",
        "--verify",
      ]
    )
    == 0
  )
  assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 28
  assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
  f32 = tmp_path / "f32"
  step_dir = on_disk.resolve_checkpoint(str(run_dir))
  export_cli.export_checkpoint(step_dir, f32)
  reader = on_disk.CheckpointReader(step_dir)
  cfg = reader.model_config
  back = hf_export.import_params(f32, cfg, scanned=cfg.scan_layers)
  for name, path, layer, shape in hf_layout.plan(cfg):
    original = reader.read(path, layer).reshape(shape)
    converted = hf_layout.TreeSource(back).read(path, layer).reshape(shape)
    np.testing.assert_array_equal(converted, original, err_msg=name)


def test_export_errors_name_the_problem(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="--step=99: no such checkpoint"):
    on_disk.resolve_checkpoint(str(run_dir), 99)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    on_disk.resolve_checkpoint(str(tmp_path))
  reader = on_disk.CheckpointReader(on_disk.resolve_checkpoint(str(run_dir)))
  sp = __import__("base64").b64decode(reader.meta["tokenizer_model_b64"])
  with pytest.raises(
    ValueError, match="the tokenizer has 4096 ids but the checkpoint's vocabulary is 1024"
  ):
    export_cli._check_vocab(sp, PRESETS["tiny"].replace(vocab_size=1024))
  with pytest.raises(
    ValueError,
    match="has 4096 ids but the checkpoint's vocabulary is 8192; pass --allow_vocab_padding",
  ):
    export_cli._check_vocab(sp, PRESETS["tiny"].replace(vocab_size=8192))
  export_cli._check_vocab(sp, PRESETS["tiny"].replace(vocab_size=8192), allow_vocab_padding=True)


def _random_gpt2(directory, cfg):
  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(
    **{
      k: v
      for k, v in hf_layout.hf_config(cfg).items()
      if k not in ("architectures", "model_type", "torch_dtype")
    }
  )
  model = transformers.GPT2LMHeadModel(hf_cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.save_pretrained(directory)


def test_import_then_train_from_the_imported_parameters(tmp_path, capsys):
  _random_gpt2(tmp_path / "hf", PRESETS["tiny"])
  assert (
    import_cli.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'init'}", "--verify"]) == 0
  )
  assert "PASS logits max abs diff" in capsys.readouterr().out
  _readable_by_others(tmp_path / "init")
  # The learning rate of step 0 is 0 (warmup), so one step leaves the imported parameters as is.
  bindings = {
    **SHORT,
    "TrainerConfig.num_steps": 1,
    "TrainerConfig.init_params_from": f"'{tmp_path / 'init'}'",
  }
  result = train_cli.main(train_args(tmp_path / "run", bindings))
  cfg = hf_export.config_from_hf(tmp_path / "hf")
  imported = hf_export.import_params(tmp_path / "hf", cfg)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result["state"].params), imported)


def test_import_of_another_model_is_refused_by_the_trainer(tmp_path):
  _random_gpt2(tmp_path / "hf", PRESETS["tiny"].replace(d_ff=128))
  assert import_cli.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'init'}"]) == 0
  with pytest.raises(
    CheckpointMismatchError,
    match=r"fc_kernel'\]: checkpoint \(2, 64, 128\) "
    r"vs model \(2, 64, 256\)",
  ):
    bindings = {**SHORT, "TrainerConfig.init_params_from": f"'{tmp_path / 'init'}'"}
    train_cli.main(train_args(tmp_path / "run", bindings))


def test_what_needs_no_tensorflow_never_imports_it_and_verify_says_what_to_install(tmp_path):
  """TensorFlow loaded before triton (a CUDA torch) crashes the process: the tokenizer, the
  sample corpus, export, generate and every --help must not load it. --verify without
  transformers names what to install, before anything is written."""
  import subprocess
  import sys

  modules = [
    "polylm_jax.data.tokenizer_cli",
    "polylm_jax.train.cache_cli",
    "polylm_jax.export.export_cli",
    "polylm_jax.export.import_cli",
    "polylm_jax.decode.generate_cli",
    "polylm_jax.eval.eval_cli",
    "polylm_jax.self_instruct.self_instruct_cli",
    "polylm_jax.train.compile_cli",
    "polylm_jax.train.train_cli",
    "polylm_jax.sweep.sweep_cli",
  ]
  script = (
    "import importlib, sys\n"
    "import polylm_jax.data.sample, polylm_jax.data.tokenizer, polylm_jax.export.verify\n"
    "import polylm_jax.decode.generate, polylm_jax.export.hf_export\n"
    f"for m in {modules!r}:\n"
    "  try:\n"
    "    importlib.import_module(m).main(['--help'])\n"
    "  except SystemExit:\n"
    "    pass\n"
    "print(sorted(n for n in ('tensorflow', 'seqio') if n in sys.modules))\n"
  )
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"
  # Each --help describes its command in whole sentences (its docstring's first paragraph).
  for block in proc.stdout.split("usage: ")[1:]:
    description = block.split("\n\n")[1]
    assert description.rstrip()[-1] in ".?", description

  out = tmp_path / "hf"
  hide = "import sys\nsys.modules['transformers'] = None  # a machine without transformers\n"
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      hide + "from polylm_jax.export import export_cli as cli\n"
      f"cli.main(['--workdir={tmp_path / 'no-run'}', '--out={out}', '--verify'])",
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 2
  assert "transformers is not installed: pip install 'polylm-jax[verify]'" in proc.stderr
  assert not out.exists()
