"""The package's import graph: layers that import only downwards, no cycle, no import hidden in a
function to dodge one. Read from the source with `ast`, without importing anything."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jmmshap")

# Bottom to top; a module may import its own layer and the ones below (docs/ARCHITECTURE.md).
LAYERS = (
    ("models", "models.bert", "models.clip", "models.clip_vision", "models.hf",
     "models.initializers", "models.mmbt", "models.resnet", "shapley", "metrics", "parallel",
     "photo_hashes", "photos", "plots", "players", "tokenizer", "toyshop", "explanations", "launch",
     "errors"),
    ("catalog", "preparation", "builders", "input_pipeline", "products"),
    ("config_checks", "workdir", "checkpoints", "stream_files", "tensorboard", "pretrained"),
    ("train_lib", "games", "mmshap", "learner_outputs", "weighting"),
    ("classifier", "clip_pretrain", "mmshap_stage", "meta", "report", "ensemble"),
    ("pipeline", "predictor"),
)
LAYER = {module: depth for depth, modules in enumerate(LAYERS) for module in modules}
# Optional dependencies, imported where they are needed so that the package works without them.
OPTIONAL = {"torch", "pandas"}


def _modules() -> dict[str, ast.Module]:
  trees = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        relative = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        module = relative.removesuffix(".__init__").removesuffix("__init__") or "__init__"
        with open(path) as f:
          trees[module] = ast.parse(f.read(), path)
  return trees


TREES = _modules()


def _imported(node: ast.AST) -> list[str]:
  """The package modules an import names: `from jmmshap.models import bert` -> models.bert,
  `from jmmshap.builders import SPLITS` -> builders."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
    names = [f"{node.module}.{alias.name}"
             if f"{node.module}.{alias.name}".removeprefix("jmmshap.") in TREES else node.module
             for alias in node.names]
  else:
    return []
  return [name.removeprefix("jmmshap.") for name in names
          if name.startswith("jmmshap.") and name.removeprefix("jmmshap.") in TREES]


def _graph() -> dict[str, set[str]]:
  return {module: {imported for node in ast.walk(tree) for imported in _imported(node)} - {module}
          for module, tree in TREES.items()}


def test_every_module_has_a_layer():
  assert set(TREES) - {"__init__"} == set(LAYER)


@pytest.mark.parametrize("module", sorted(LAYER))
def test_a_module_imports_only_its_own_layer_and_below(module):
  higher = {other for other in _graph()[module] if LAYER[other] > LAYER[module]}
  assert not higher, f"jmmshap.{module} imports from a higher layer: {sorted(higher)}"


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  state = {}

  def visit(module, path):
    state[module] = "open"
    for other in sorted(graph[module]):
      if state.get(other) == "open":
        cycle = path[path.index(other):] + [other]
        raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
      if other not in state:
        visit(other, path + [other])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_imports_are_at_the_top_of_every_file():
  hidden = []
  for module, tree in TREES.items():
    for function in ast.walk(tree):
      if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(function):
          if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            if not all(name.split(".")[0] in OPTIONAL for name in names):
              hidden.append(f"jmmshap/{module}: {function.name} imports {', '.join(names)}")
  assert not hidden, "\n".join(hidden)


def test_no_source_file_is_over_700_lines():
  long = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name)) as f:
          count = sum(1 for _ in f)
        if count > 700:
          long[name] = count
  assert not long, long
