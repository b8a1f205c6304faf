"""The documentation names only things that exist: README.md and docs/*.md.

Checked, with configs loaded as `train.py` loads them (`configs.<stage>.get_config(arg)`), no training:

1. Config flags. A *command* is a `python ...` invocation in a fenced shell block or in one inline
   code span of prose (a span may wrap over a line break); shell continuations (`\\`), `&&`, `;`,
   `&` and `|` separate or join commands as the shell does, and `$NAME` / `${NAME}` is replaced by
   what an earlier `NAME=...` line of the same block set (so `IMG="--config.stages.image.x=1"`
   followed by `python train.py --config=configs/meta.py $IMG` is checked against meta).
   - A command with `--config=configs/<stage>.py[:arg]` must load that config, and each of its
     `--config.a.b=v` flags must name a field of exactly that config (placeholders count; a
     ConfigDict node counts for a template such as `--config.stages.image.<option>`, whose prefix
     is checked). An inline span without `--config=` but with a bare `configs/<stage>.py[:arg]`
     (prose such as "`configs/image.py:fashion --config.label_smoothing=0.0`") is checked against
     that config the same way.
   - Any other `--config.a.b` (prose, shell comments, a `NAME=` line, a command without a config)
     must name a field of at least one config: some `configs/<stage>.py` under some variant and
     option, `configs/meta.py` included, whose `stages.<stage>` nesting is how the main job takes a
     stage's field. So a renamed field fails wherever it is still named.
2. Scripts. `python X.py` / `python scripts/X.py` must name a file of the repository, and every
   `jmmshap/`, `scripts/`, `configs/` or `tests/` path to a .py or .sh file must exist. A script's
   own flags (`--name=...`, not `--config...`) must be defined by the script (absl `DEFINE_*`,
   argparse `add_argument`) or by a `jmmshap` module it imports (`launch.py`'s multi-process
   flags); scripts that define none are not checked.
3. Links. A relative link or image must name an existing file, and a `#fragment` into a Markdown
   file must be one of its headings (GitHub's anchors); `PENDING_ANCHORS` lists sections being
   written elsewhere, accepted only until a heading of that name (or a longer one) exists.
4. The README's "Explaining your own model" block (run by tests/test_games.py) is the same code as
   docs/MMSHAP.md's.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import importlib
import os
import re
import shlex

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", *sorted(os.path.relpath(path, REPO)
                             for path in glob.glob(os.path.join(REPO, "docs", "*.md"))))
STAGES = ("text", "image", "clip_pretrain", "mmbt", "mmshap", "meta")
# Anchors of sections another change is adding: accepted while the file has no heading whose anchor
# starts with it, so a section that lands under a longer name fails the link until it is fixed.
PENDING_ANCHORS = {("docs/RESULTS.md", "multimodal-collapse")}
# absl's own flags, which every absl script takes.
ABSL_FLAGS = {"alsologtostderr", "logtostderr", "verbosity", "v", "log_dir", "stderrthreshold",
              "flagfile", "undefok", "help", "helpfull", "helpshort", "only_check_args"}
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}

_FLAG = re.compile(r"--config\.([A-Za-z_][\w.]*)(<?)")
_CONFIG_ARG = re.compile(r"^(?:--config=)?configs/(\w+)\.py(?::([\w,]+))?$")
_REPO_PATH = re.compile(r"(?<![\w./-])((?:jmmshap|scripts|configs|tests)/[\w./-]*\w\.(?:py|sh))\b")
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
_SEPARATORS = re.compile(r"\s(?:&&|\|\||;|&|\|)\s|;\s|\s&$|;$")


@dataclasses.dataclass(frozen=True)
class Flag:
  doc: str
  line: int
  path: str  # a.b.c of --config.a.b.c
  template: bool  # --config.a.b.<...>: only the prefix is a field.
  config: tuple[str, str | None] | None  # (stage, arg) of its command, or None: any config.

  def where(self) -> str:
    context = "any config" if self.config is None else (
        f"configs/{self.config[0]}.py" + (f":{self.config[1]}" if self.config[1] else ""))
    return f"{self.doc}:{self.line}: --config.{self.path} ({context})"


@dataclasses.dataclass(frozen=True)
class Command:
  doc: str
  line: int
  script: str
  flags: tuple[str, ...]  # The script's own --name flags.


@dataclasses.dataclass
class Parsed:
  flags: list[Flag] = dataclasses.field(default_factory=list)
  commands: list[Command] = dataclasses.field(default_factory=list)
  paths: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
  configs: list[tuple[str, int, str, str | None]] = dataclasses.field(default_factory=list)
  links: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)


def _tokens(text: str) -> list[str]:
  try:
    return shlex.split(text, comments=False)
  except ValueError:  # An unbalanced quote in prose.
    return text.split()


def _config_of(token: str, bare_allowed: bool) -> tuple[str, str | None] | None:
  """(stage, arg) of `--config=configs/<stage>.py[:arg]`, or, where bare_allowed, of a bare
  `configs/<stage>.py:arg` (a bare path without a variant is a file name, not a config)."""
  match = _CONFIG_ARG.match(token)
  if match is None or (not token.startswith("--config=") and not (bare_allowed and match.group(2))):
    return None
  return match.group(1), match.group(2)


def _unit(parsed: Parsed, doc: str, line: int, text: str, env: dict[str, str],
          prose: bool) -> None:
  """One logical shell line or one inline code span: its commands, flags and paths."""
  for name, value in env.items():
    text = text.replace("${" + name + "}", value)
    text = re.sub(r"\$" + name + r"\b", lambda _: value, text)
  for path in _REPO_PATH.findall(text):
    parsed.paths.append((doc, line, path))
  for token in _tokens(text):
    if config := _config_of(token, bare_allowed=prose):
      parsed.configs.append((doc, line, *config))
  for segment in _SEPARATORS.split(text):
    tokens = _tokens(segment)
    if not tokens:
      continue
    if all(_ASSIGNMENT.match(token) for token in tokens):  # NAME=value lines: their flags are bare.
      for token in tokens:
        name, value = token.split("=", 1)
        env[name] = value
      _bare_flags(parsed, doc, line, segment)
      continue
    starts = [i for i, token in enumerate(tokens) if re.fullmatch(r"python3?", token)]
    if not starts:  # Prose: a bare config path gives the context, else any config.
      config = next((c for t in tokens if (c := _config_of(t, bare_allowed=prose))), None)
      _flags(parsed, doc, line, tokens, config)
      continue
    if starts[0] > 0:
      _flags(parsed, doc, line, tokens[:starts[0]], None)
    for begin, end in zip(starts, [*starts[1:], len(tokens)]):
      command = tokens[begin + 1:end]
      config = next((c for t in command if (c := _config_of(t, bare_allowed=False))), None)
      if config is None and prose:
        config = next((c for t in command if (c := _config_of(t, bare_allowed=True))), None)
      _flags(parsed, doc, line, command, config)
      script = next((t for t in command if not t.startswith("-")), None)
      if command and command[0].startswith("-"):  # python -m ..., python -c ...
        continue
      if script and script.endswith(".py"):
        own = tuple(token[2:].split("=", 1)[0] for token in command
                    if token.startswith("--") and not token.startswith("--config"))
        parsed.commands.append(Command(doc, line, script, own))


def _flags(parsed: Parsed, doc: str, line: int, tokens: list[str],
           config: tuple[str, str | None] | None) -> None:
  for token in tokens:
    for path, template in _FLAG.findall(token):
      parsed.flags.append(Flag(doc, line, path.rstrip("."), bool(template), config))


def _bare_flags(parsed: Parsed, doc: str, line: int, text: str) -> None:
  for path, template in _FLAG.findall(text):
    parsed.flags.append(Flag(doc, line, path.rstrip("."), bool(template), None))


def _strip_comment(line: str) -> tuple[str, str]:
  match = re.search(r"(^|\s)#", line)
  return (line, "") if match is None else (line[:match.start()], line[match.end():])


def parse(doc: str, text: str) -> Parsed:
  parsed = Parsed()
  lines = text.split("\n")
  prose: list[tuple[int, str]] = []
  i = 0
  while i < len(lines):
    fence = re.match(r"^\s*```(\w*)", lines[i])
    if fence is None:
      prose.append((i + 1, lines[i]))
      i += 1
      continue
    language, start = fence.group(1), i + 1
    i += 1
    block = []
    while i < len(lines) and not re.match(r"^\s*```", lines[i]):
      block.append((i + 1, lines[i]))
      i += 1
    i += 1
    if language not in SHELL_FENCES:
      continue
    env: dict[str, str] = {}
    logical, first = "", start
    for number, raw in block:
      code, comment = _strip_comment(raw)
      if comment:
        _bare_flags(parsed, doc, number, comment)
      if not logical:
        first = number
      if code.rstrip().endswith("\\"):
        logical += code.rstrip()[:-1] + " "
        continue
      _unit(parsed, doc, first, logical + code, env, prose=False)
      logical = ""
    if logical:
      _unit(parsed, doc, first, logical, env, prose=False)

  # Prose: inline code spans (which may wrap), then flags outside them.
  joined = "\n".join(line for _, line in prose)
  numbers = [number for number, _ in prose]

  def line_of(offset: int) -> int:
    return numbers[min(joined.count("\n", 0, offset), len(numbers) - 1)]

  outside = []
  last = 0
  for span in re.finditer(r"(`+)(.+?)\1", joined, re.S):
    _unit(parsed, doc, line_of(span.start()), span.group(2).replace("\n", " "), {}, prose=True)
    outside.append((last, joined[last:span.start()]))
    last = span.end()
  outside.append((last, joined[last:]))
  for offset, text_part in outside:
    for flag in _FLAG.finditer(text_part):
      parsed.flags.append(Flag(doc, line_of(offset + flag.start()), flag.group(1).rstrip("."),
                               bool(flag.group(2)), None))
    for link in re.finditer(r"\]\(([^)\s]+)\)", text_part):
      parsed.links.append((doc, line_of(offset + link.start()), link.group(1)))
    for path in _REPO_PATH.finditer(text_part):
      parsed.paths.append((doc, line_of(offset + path.start()), path.group(1)))
  return parsed


@functools.cache
def parsed_docs() -> dict[str, Parsed]:
  result = {}
  for doc in DOCS:
    with open(os.path.join(REPO, doc)) as f:
      result[doc] = parse(doc, f.read())
  return result


@functools.cache
def load_config(stage: str, arg: str | None) -> ml_collections.ConfigDict:
  module = importlib.import_module(f"configs.{stage}")
  return module.get_config() if arg is None else module.get_config(arg)


def _options(stage: str) -> tuple[str, ...]:
  return ("paper", "meta_paper") if stage == "meta" else ("paper",)


def _paths(node: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  paths = set()
  for key in node.keys():
    path = prefix + key
    paths.add(path)
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict):
      paths |= _paths(value, path + ".")
  return paths


@functools.cache
def every_field() -> frozenset[str]:
  """Every field path of every stage config, under every variant and option."""
  from configs import common
  paths = set()
  for stage in STAGES:
    for variant in common.VARIANTS:
      for arg in (variant, *(f"{variant},{option}" for option in _options(stage))):
        try:
          paths |= _paths(load_config(stage, arg))
        except ValueError:  # An option a stage does not take.
          continue
  return frozenset(paths)


def has_field(config: ml_collections.ConfigDict, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def config_problems(configs: list[tuple[str, int, str, str | None]]) -> list[str]:
  problems = []
  for doc, line, stage, arg in configs:
    where = f"{doc}:{line}: configs/{stage}.py" + (f":{arg}" if arg else "")
    if stage not in STAGES:
      problems.append(f"{where}: not a stage config")
      continue
    try:
      load_config(stage, arg)
    except ValueError as error:
      problems.append(f"{where}: does not load: {error}")
  return problems


def flag_problems(flags: list[Flag]) -> list[str]:
  problems = []
  for flag in flags:
    if flag.config is None:
      if flag.path not in every_field():
        problems.append(f"{flag.where()}: no config has this field")
      continue
    stage, arg = flag.config
    if stage not in STAGES:
      problems.append(f"{flag.where()}: configs/{stage}.py is not a stage config")
      continue
    try:
      config = load_config(stage, arg)
    except ValueError as error:
      problems.append(f"{flag.where()}: the config does not load: {error}")
      continue
    if not has_field(config, flag.path):
      problems.append(f"{flag.where()}: not a field of this config")
  return problems


@functools.cache
def script_flags(script: str) -> frozenset[str] | None:
  """The flags a script defines (absl or argparse), with those of the jmmshap modules it imports;
  None: it defines none, or is not Python."""

  def defined(path: str) -> set[str]:
    with open(path) as f:
      source = f.read()
    names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", source))
    names |= {name.lstrip("-") for name in re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", source)}
    return names

  path = os.path.join(REPO, script)
  names = defined(path)
  if not names:
    return None
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    modules = []
    if isinstance(node, ast.ImportFrom) and node.module == "jmmshap":
      modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jmmshap."):
      modules = [node.module.split(".", 1)[1]]
    for module in modules:
      module_path = os.path.join(REPO, "jmmshap", *module.split(".")) + ".py"
      if os.path.exists(module_path):
        names |= defined(module_path)
  return frozenset(names | ABSL_FLAGS)


def command_problems(commands: list[Command]) -> list[str]:
  problems = []
  for command in commands:
    where = f"{command.doc}:{command.line}: python {command.script}"
    if not os.path.isfile(os.path.join(REPO, command.script)):
      problems.append(f"{where}: no such file")
      continue
    known = script_flags(command.script)
    if known is None:
      continue
    for flag in command.flags:
      if flag not in known and not (flag.startswith("no") and flag[2:] in known):
        problems.append(f"{where}: the script defines no --{flag}")
  return problems


def _slug(heading: str) -> str:
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # A link's text.
  text = text.replace("`", "").replace("*", "").strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


@functools.cache
def anchors(doc: str) -> frozenset[str]:
  with open(os.path.join(REPO, doc)) as f:
    text = f.read()
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  seen: dict[str, int] = {}
  result = set()
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
    slug = _slug(heading)
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    result.add(slug if count == 0 else f"{slug}-{count}")
  return frozenset(result)


def link_problems(links: list[tuple[str, int, str]]) -> list[str]:
  problems = []
  for doc, line, target in links:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, data:
      continue
    path, _, fragment = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    where = f"{doc}:{line}: ({target})"
    if not os.path.exists(os.path.join(REPO, resolved)):
      problems.append(f"{where}: no such file {resolved}")
      continue
    if not fragment or not resolved.endswith(".md") or fragment in anchors(resolved):
      continue
    landed = [anchor for anchor in anchors(resolved) if anchor.startswith(fragment)]
    if (resolved, fragment) not in PENDING_ANCHORS or landed:
      problems.append(f"{where}: {resolved} has no heading with this anchor"
                      + (f" (did you mean #{landed[0]}?)" if landed else ""))
  return problems


def _all(attribute: str) -> list:
  return [item for parsed in parsed_docs().values() for item in getattr(parsed, attribute)]


def test_the_parser_finds_commands_and_flags_in_blocks_prose_and_variables():
  text = "\n".join([
      "Prose `--config.stages.text.num_epochs=2` and `configs/image.py:fashion",
      "--config.label_smoothing=0.0`, a [link](docs/RESULTS.md#results).",
      "```bash",
      'IMG="--config.stages.image.random_flip=True \\',
      '     --config.stages.image.bogus=1"',
      "python train.py --config=configs/meta.py:fashion --workdir=W $IMG  # --config.num_epochs=1",
      "PYTHONPATH=. python scripts/meta_seeds.py --config=configs/meta.py --seeds=0,1 && \\",
      "  python predict.py --workdir=W --output=O --no_explain",
      "```",
  ])
  parsed = parse("X.md", text)
  got = {(flag.path, flag.config) for flag in parsed.flags}
  assert ("stages.text.num_epochs", None) in got
  assert ("label_smoothing", ("image", "fashion")) in got
  assert ("stages.image.bogus", None) in got  # From the NAME= line ...
  assert ("stages.image.bogus", ("meta", "fashion")) in got  # ... and where $IMG is used.
  assert ("num_epochs", None) in got  # A comment is prose.
  assert [(c.script, c.flags) for c in parsed.commands] == [
      ("train.py", ("workdir",)), ("scripts/meta_seeds.py", ("seeds",)),
      ("predict.py", ("workdir", "output", "no_explain"))]
  assert parsed.links == [("X.md", 2, "docs/RESULTS.md#results")]
  problems = flag_problems(parsed.flags)
  assert len(problems) == 2 and all("stages.image.bogus" in p for p in problems), problems


def test_a_renamed_field_or_script_flag_fails():
  flags = [Flag("X.md", 1, "num_epoch", False, ("text", None)),  # Typo in a command.
           Flag("X.md", 2, "stages.image.random_flips", False, None),  # Typo in prose.
           Flag("X.md", 3, "random_flip", False, ("text", None)),  # The image learner's field.
           Flag("X.md", 4, "data.manual_dir", False, ("text", None)),  # toyshop has none.
           Flag("X.md", 5, "data.manual_dir", False, ("text", "fashion")),
           Flag("X.md", 6, "stages.mmbt", True, ("meta", "toyshop,paper"))]
  problems = flag_problems(flags)
  assert [p.split(":")[1] for p in problems] == ["1", "2", "3", "4"], problems
  commands = [Command("X.md", 1, "predict.py", ("workdir", "no_explain", "nono_explain", "inputs")),
              Command("X.md", 2, "scripts/nothing.py", ()),
              Command("X.md", 3, "train.py", ("process_id", "config", "local_device_ids"))]
  problems = command_problems(commands)
  assert len(problems) == 2 and "--inputs" in problems[0] and "no such file" in problems[1], problems
  assert config_problems([("X.md", 1, "text", "fashion,paper"), ("X.md", 2, "text", "fashon"),
                          ("X.md", 3, "common", None), ("X.md", 4, "meta", "toyshop,meta_paper"),
                          ("X.md", 5, "image", "toyshop,meta_paper")]) == [
      "X.md:2: configs/text.py:fashon: does not load: unknown variant 'fashon': use one of "
      "toyshop, fashion, fashion_sub, taimd17k",
      "X.md:3: configs/common.py: not a stage config",
      "X.md:5: configs/image.py:toyshop,meta_paper: does not load: unknown option(s) "
      "['meta_paper'] after 'toyshop': use paper"]


def test_a_broken_link_or_anchor_fails():
  links = [("README.md", 1, "docs/RESULTS.md#second-task-sub_category--100-items"),
           ("docs/TRAINING.md", 2, "RESULTS.md#fashion-products-article_type-top-31"),
           ("docs/TRAINING.md", 3, "#stages"),
           ("README.md", 4, "https://example.com/x.md#nothing"),
           ("README.md", 5, "docs/RESULTS.md#no-such-section"),
           ("README.md", 6, "docs/NOTHING.md"),
           ("docs/TRAINING.md", 7, "../README.md#quick-starts")]
  problems = link_problems(links)
  assert [p.split(":")[1] for p in problems] == ["5", "6", "7"], problems


def test_every_config_flag_in_the_docs_is_a_field():
  flags = _all("flags")
  assert len(flags) > 100  # The parser still finds them.
  problems = config_problems(_all("configs")) + flag_problems(flags)
  assert not problems, "\n".join(problems)


def test_every_script_and_its_flags_exist():
  commands = _all("commands")
  assert {"train.py", "predict.py"} <= {command.script for command in commands}
  problems = command_problems(commands)
  problems += [f"{doc}:{line}: {path}: no such file" for doc, line, path in _all("paths")
               if not os.path.isfile(os.path.join(REPO, path))]
  assert not problems, "\n".join(problems)


def test_every_relative_link_and_anchor_exists():
  problems = link_problems(_all("links"))
  assert not problems, "\n".join(problems)


def _python_block(doc: str, heading: str) -> str:
  with open(os.path.join(REPO, doc)) as f:
    section = f.read().split(heading, 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_and_the_mmshap_guide_show_the_same_example():
  # tests/test_games.py runs the README's block; docs/MMSHAP.md shows it in its guide.
  assert _python_block("README.md", "## Explaining your own model") == _python_block(
      "docs/MMSHAP.md", "## Explaining your own model")


@pytest.mark.parametrize("doc", [doc for doc in DOCS if doc not in (
    "README.md", "docs/RESULTS.md", "docs/BENCHMARKS.md", "docs/TESTING.md")])
def test_every_guide_opens_with_a_command(doc):
  with open(os.path.join(REPO, doc)) as f:
    head = f.read().split("\n## ", 1)[0]
  block = re.search(r"```bash\n(.*?)```", head, re.S)
  assert block and re.search(r"\bpython3? ", block.group(1)), f"{doc}: no command before its first section"
