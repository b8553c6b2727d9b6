"""The direction of imports between the first-level packages of polylm_jax (docs/architecture.md):
no package imports one that imports it back, counting imports inside functions, and each stays
in its layer. Read from the source, so a new import that breaks the layering fails here."""

import ast
import pathlib

import polylm_jax

ROOT = pathlib.Path(polylm_jax.__file__).parent

# Lower layers first; a unit may import units of its own layer or of lower ones only (within a
# layer, the graph must still have no cycle). As docs/architecture.md draws them.
LAYERS = [
  ["typecheck", "errors", "background", "console", "framing", "tpu_slices"],
  ["io", "languages", "config", "chat", "optimizer", "sharding"],
  ["kernels"],
  ["model"],
  ["data"],
  ["checkpoint"],
  ["trainer", "export"],
  ["decode"],
  ["eval", "self_instruct"],
  ["train"],
  ["sweep"],
]


def _unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def _imports() -> dict[str, dict[str, set[str]]]:
  """{unit: {imported unit: {files that import it}}} for every import in polylm_jax, at module
  level or inside a function."""
  out: dict[str, dict[str, set[str]]] = {}
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    module = ".".join(rel.parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = package.split(".")[: len(package.split(".")) - node.level + 1]
          targets.append(".".join(base + ([node.module] if node.module else [])))
        elif node.module == "polylm_jax":
          targets += [f"polylm_jax.{a.name}" for a in node.names]
        elif node.module:
          targets.append(node.module)
    for target in targets:
      if target.startswith("polylm_jax.") and _unit(target) != _unit(module):
        out.setdefault(_unit(module), {}).setdefault(_unit(target), set()).add(str(rel))
  return out


def test_every_unit_has_a_layer():
  units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()}
  units = {u for u in units if not u.startswith("_") and u != "gin_configs"}
  placed = {u for layer in LAYERS for u in layer}
  assert units - placed == set(), "add the new package or module to LAYERS and the docs"


def test_imports_run_downward():
  level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
  upward = [
    f"{unit} imports {target} ({', '.join(sorted(files))})"
    for unit, targets in _imports().items()
    for target, files in targets.items()
    if level[target] > level[unit]
  ]
  assert upward == []


def test_no_package_imports_one_that_imports_it_back():
  graph = {u: set(t) for u, t in _imports().items()}

  def reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
      u = todo.pop()
      if u == goal:
        return True
      if u not in seen:
        seen.add(u)
        todo += graph.get(u, ())
    return False

  loops = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
  assert loops == []


def test_the_training_engine_does_not_import_evaluation_or_the_commands():
  imported = set(_imports().get("trainer", {}))
  assert not imported & {"eval", "train", "decode", "export", "self_instruct"}


def test_no_function_is_over_100_lines():
  """A function that wires things together stays readable in one sitting."""
  long = []
  for path in ROOT.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 100:
          long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
  assert long == []


def test_only_command_modules_exit_the_process():
  """Library code raises (errors.py); only command-line modules turn that into an exit."""
  exits = []
  for path in ROOT.rglob("*.py"):
    if path.name.endswith("_cli.py") or path.name == "__main__.py":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Raise) and "SystemExit" in ast.unparse(node.exc or node):
        exits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
      if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "os._exit", "exit"):
        exits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
  assert exits == []


def test_the_trainer_loads_no_heavy_optional_package(tmp_path):
  """torch, transformers, lm_eval and Beam load only where used: the training command, its loop
  and its metrics writers (TensorBoard events included) start without them."""
  import subprocess
  import sys

  script = f"""
import sys
from polylm_jax.train import train_cli
from polylm_jax.trainer import loop
from polylm_jax.trainer.metrics import MetricsWriter
writer = MetricsWriter({str(tmp_path)!r}, tensorboard=True)
writer.write(1, {{"loss": 1.0}})
writer.close()
print(sorted(m for m in ("torch", "transformers", "lm_eval", "apache_beam") if m in sys.modules))
"""
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
  )
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
