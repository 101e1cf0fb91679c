"""Policy files as text → plain data, remembering where every value came from (file and line), so a
validation error can say "tasks.yaml:14: tasks.fw-push.duration.max: …".

YAML is read with the safe loader's scalar rules, with three changes that matter for reviewable policy:
a key given twice is an error (PyYAML would keep the last silently); "22:00" stays text (YAML 1.1 would
read it as the sexagesimal number 1320); custom tags are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

Path = tuple[str | int, ...]


class PolicyError(ValueError):
    """A policy that cannot be used. `problems` lists every error found, each naming file and line."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems) if len(problems) < 4 else f"{len(problems)} problems: " + "; ".join(problems[:3]) + "; …")
        self.problems = problems


@dataclass
class Located:
    """Parsed data of one file, and the line of every path in it."""

    name: str
    data: object
    lines: dict[Path, int] = field(default_factory=dict)

    def where(self, path: Path) -> str:
        """'file:line' for a path, or for its nearest ancestor with a known line."""
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        return f"{self.name}:{self.lines.get(p, 1)}"


def parse(name: str, text: str) -> Located:
    """Parse one YAML document. Raises PolicyError (with file and line) on syntax errors."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Located(name, {}, {(): 1})
        located = Located(name, None)
        located.data = _convert(loader, node, (), located.lines)
        return located
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError([f"{name}:{line}: not valid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([f"{name}: not valid YAML: {exc}"]) from None
    finally:
        loader.dispose()


def path_text(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out or "(top level)"


_PLAIN_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq",
}


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: Path, lines: dict[Path, int]):
    lines.setdefault(path, node.start_mark.line + 1)
    if node.tag not in _PLAIN_TAGS:
        raise _marked(node, f"the tag {node.tag} is not allowed in policy files")
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _marked(key_node, "keys must be plain text")
            key = key_node.value
            if key == "<<":
                raise _marked(key_node, "merge keys (<<) are not allowed: write entries out, so a review sees them")
            if key in out:
                raise _marked(key_node, f"{path_text(path + (key,))} is given twice")
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _convert(loader, value_node, path + (key,), lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, item, path + (i,), lines) for i, item in enumerate(node.value)]
    if node.tag == "tag:yaml.org,2002:int" and ":" in node.value:
        return node.value  # "22:00" is a time of day, not 1320
    return loader.construct_object(node, deep=True)


def _marked(node: yaml.Node, problem: str) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=node.start_mark)
