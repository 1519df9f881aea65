"""params.yaml, generated from the schema: every key with its default and its docstring as a
comment, so the file a newcomer reads and DVC tracks cannot drift from pipeline/config.py.

    python -m pipeline params > params.yaml     # after changing the schema
    python -m pipeline params --check           # what CI runs: the file is what the schema says
"""
import ast
import difflib
import inspect
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml
from pydantic import BaseModel

from convheads import ConvHeadsError

from .config import TASK_DEFAULTS, TASKS, PipelineConfig

PARAMS_FILE = "params.yaml"
WIDTH = 110
HEADER = """\
# The pipeline's configuration: read by `python -m flows.compress` (Prefect) and by every dvc.yaml
# stage. Generated from the schema, pipeline/config.py, by `python -m pipeline params > params.yaml`:
# change a default there, not here. For a run of your own, override keys on the command line
# (`python -m flows.compress recover.epochs=5`, `dvc exp run -S recover.epochs=5`) or keep the keys you
# change in a file of your own (`--params mine.yaml`: the keys it leaves out take these defaults).
"""


def attribute_docs(cls: type) -> Dict[str, str]:
    """{field: its docstring (the string right below it)} of a class and its bases, nearest first."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] not in ("convheads", "pipeline"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def section_type(cls: type, name: str) -> Optional[type]:
    """The class of field `name` of `cls` if it is a section (a model or a settings dataclass) itself."""
    fields = cls.model_fields if issubclass(cls, BaseModel) else cls.__pydantic_fields__
    annotation = fields[name].annotation
    is_section = isinstance(annotation, type) and (issubclass(annotation, BaseModel)
                                                   or hasattr(annotation, "__pydantic_fields__"))
    return annotation if is_section else None


def _value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").strip()


def _comment(text: str, indent: str) -> List[str]:
    """`text` as comment lines, its paragraphs (blank-line separated) rewrapped."""
    return [f"{indent}# {line}" for paragraph in text.split("\n\n")
            for line in textwrap.wrap(" ".join(paragraph.split()), WIDTH - len(indent) - 2)]


def _task_default(stage: str, key: str) -> Optional[str]:
    values = [(task, TASK_DEFAULTS[task].get(stage, {}).get(key)) for task in TASKS]
    if all(v is None for _, v in values):
        return None
    return "null: the task's: " + ", ".join(f"{v} for {task}" for task, v in values)


def _render(cls: type, data: dict, path: List[str], indent: str = "") -> List[str]:
    docs, lines = attribute_docs(cls), []
    for key, value in data.items():
        doc = docs.get(key, "")
        by_task = _task_default(path[0], key) if len(path) == 1 else None
        if by_task:
            value, doc = None, f"{doc} {by_task}".strip()
        if doc:
            lines += _comment(doc, indent)
        inner = section_type(cls, key)
        if inner is None:
            lines.append(f"{indent}{key}: {_value(value)}")
        else:
            if inner.__doc__ and not doc:
                lines += _comment(inspect.cleandoc(inner.__doc__), indent)
            lines.append(f"{indent}{key}:")
            lines += _render(inner, value, [*path, key], indent + "  ")
    return lines


def params_yaml() -> str:
    """params.yaml as the schema's defaults and docstrings say."""
    defaults = PipelineConfig.model_validate({}).model_dump(mode="json")
    sections = [[]]
    for key, value in defaults.items():  # a blank line between top-level sections
        chunk = _render(PipelineConfig, {key: value}, [])
        sections.append(([""] if section_type(PipelineConfig, key) else []) + chunk)
    return HEADER + "\n".join(line for chunk in sections for line in chunk) + "\n"


def check_params_file(path: Path) -> None:
    """Raise, with the first difference, unless `path` holds what `params_yaml` generates."""
    expected = params_yaml()
    found = path.read_text() if path.is_file() else ""
    if found == expected:
        return
    diff = list(difflib.unified_diff(found.splitlines(), expected.splitlines(), str(path), "the schema", lineterm="",
                                     n=0))
    raise ConvHeadsError(f"{path} is not what the schema (pipeline/config.py) generates; regenerate it with "
                         f"`python -m pipeline params > {path}`. First differences:\n" + "\n".join(diff[:12]))


REFERENCE_FILE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REFERENCE_HEADER = """\
<!-- Generated from pipeline/config.py by `python -m pipeline reference`: change the schema, not this file. -->

# Configuration reference

Every setting of the pipeline, with its default and what it does, generated from the schema
(`pipeline/config.py`) that validates `params.yaml`, the Prefect flow's parameters and every command
line. Override any key with `key=value` (`python -m flows.compress recover.epochs=5`), or keep the
keys you change in a file of your own (`--params mine.yaml`). Unknown keys, wrong types and
impossible values fail before any work, naming the key.
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(cls: type, data: dict, path: List[str]) -> List[str]:
    """Table rows `| key | default | meaning |` of a section, nested sections flattened to dotted keys."""
    docs, rows = attribute_docs(cls), []
    for key, value in data.items():
        doc = docs.get(key, "")
        by_task = _task_default(path[0], key) if len(path) == 1 else None
        if by_task:
            value, doc = None, f"{doc} {by_task}".strip()
        inner = section_type(cls, key)
        if inner is None:
            rows.append(f"| `{'.'.join([*path, key])}` | `{_cell(_value(value))}` | {_cell(doc)} |")
        else:
            rows += _rows(inner, value, [*path, key])
    return rows


def reference_markdown() -> str:
    """The configuration reference page: a table per top-level section, with the section's docstring."""
    defaults = PipelineConfig.model_validate({}).model_dump(mode="json")
    docs = attribute_docs(PipelineConfig)
    top = {k: v for k, v in defaults.items() if section_type(PipelineConfig, k) is None}
    head = "| key | default | meaning |\n| --- | --- | --- |"
    parts = [REFERENCE_HEADER, "## Top level\n", head, *_rows(PipelineConfig, top, []), ""]
    for key, value in defaults.items():
        inner = section_type(PipelineConfig, key)
        if inner is None:
            continue
        about = docs.get(key) or (inspect.cleandoc(inner.__doc__) if inner.__doc__ else "")
        parts += [f"## {key}\n", *([" ".join(p.split()) + "\n" for p in about.split("\n\n")] if about else []),
                  head, *_rows(inner, value, [key]), ""]
    return "\n".join(parts)


def check_reference(path: Path) -> None:
    """Raise unless `path` holds what `reference_markdown` generates."""
    found = path.read_text() if path.is_file() else ""
    if found != reference_markdown():
        raise ConvHeadsError(f"{path} is not what the schema (pipeline/config.py) generates; regenerate it with "
                             f"`python -m pipeline reference`")


def overrides(cfg: PipelineConfig, cls: type = PipelineConfig, data: Optional[dict] = None,
              defaults: Optional[dict] = None, path: Tuple[str, ...] = ()) -> List[str]:
    """The `key=value` command-line overrides that turn the schema's defaults into `cfg`: a
    configuration as one command (a mapping that is not a section, e.g. model.kwargs, goes whole)."""
    if data is None:
        # against the defaults of cfg's task: the task's own training defaults are no override
        data = cfg.model_dump(mode="json")
        defaults = PipelineConfig.model_validate({"task": cfg.task}).model_dump(mode="json")
    out = []
    for key, value in data.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        inner = section_type(cls, key)
        if inner is not None and isinstance(value, dict):
            out += overrides(cfg, inner, value, default, (*path, key))
        elif value != default:
            out.append(f"{'.'.join((*path, key))}={_value(value)}")
    return out
