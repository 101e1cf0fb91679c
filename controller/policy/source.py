"""Policy files as text → plain data, remembering where every value came from (file and line), so a
validation error can say "tasks.yaml:14: tasks.fw-push.duration.max: …".

YAML is read with the safe loader's scalar rules, with three changes that matter for reviewable policy:
a key given twice is an error (PyYAML would keep the last silently); "22:00" stays text (YAML 1.1 would
read it as the sexagesimal number 1320); custom tags and merge keys are refused. Anchors and aliases
work, but a file may expand to at most MAX_NODES values, so a few hundred bytes of nested aliases
cannot stand for millions of items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

Path = tuple[str | int, ...]
MAX_NODES = 200_000  # a large real policy (100 tasks, 50 device types) has about 10 000


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
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters, surrogates and U+FFFE/U+FFFF here
        node = loader.get_single_node()
        if node is None:
            return Located(name, {}, {(): 1})
        located = Located(name, None)
        located.data = _convert(loader, node, (), located.lines, [MAX_NODES])
        return located
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError([f"{name}:{line}: not valid YAML: {exc.problem or exc}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1 if isinstance(text, str) else 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise PolicyError([f"{name}:{line}: not valid YAML: the character {char} is not allowed (control characters, "
                           "surrogates and non-characters)"]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([f"{name}: not valid YAML: {exc}"]) from None
    finally:
        if loader is not None:
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


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: Path, lines: dict[Path, int], budget: list[int]):
    budget[0] -= 1
    if budget[0] < 0:
        raise _marked(node, f"the file expands to more than {MAX_NODES} values (aliases repeat what they point at)")
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
            out[key] = _convert(loader, value_node, path + (key,), lines, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, item, path + (i,), lines, budget) for i, item in enumerate(node.value)]
    if node.tag == "tag:yaml.org,2002:int" and ":" in node.value:
        return node.value  # "22:00" is a time of day, not 1320
    return loader.construct_object(node, deep=True)


def _marked(node: yaml.Node, problem: str) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=node.start_mark)
