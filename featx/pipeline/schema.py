"""The pipeline schema: every table and key of a pipeline file, its type,
default and allowed values, and the checks that turn a mistake into one
``FILE: KEY: problem`` line.

Keys that are command options are generated from :mod:`featx.options`
(one declaration per option); the rest are declared in :data:`SCHEMA`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from ..options import CLASSIFY, DATASET, EXTRACT, FINETUNE

STAGES = ("extract", "train", "finetune", "evaluate", "report")
FORCE_STAGES = STAGES + ("all",)
REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One key of a table: its type, default and what values are allowed.

    ``kind``: ``str``, ``int``, ``float`` (an int is accepted), ``bool``,
    ``str_list``, ``number`` (int or float, kept as given), ``table``; ``choices``: allowed values (a
    callable returning them, for registries); ``check(value)`` returns a
    problem (``"must be at least 1"``) or None; ``what`` describes the
    value for the "missing" message.
    """

    kind: str
    default: Any = None
    choices: Any = None
    check: Callable[[Any], str | None] | None = None
    what: str = ""


def _at_least(n):
    return lambda v: None if v >= n else f"must be at least {n}"


def _regex(v):
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    return None


def _pca(v):
    if isinstance(v, int):
        return None if v >= 1 else "must be a number of components >= 1 or a variance fraction in (0, 1)"
    return None if 0 < v < 1 else "must be a number of components >= 1 or a variance fraction in (0, 1)"


def _non_empty(v):
    return None if v else "must not be empty"


def _backbone_names():
    from ..backbones import list_backbones
    return list_backbones()


def _classifier_names():
    from ..classify import CLASSIFIERS
    return list(CLASSIFIERS)


def _keys(options, table: str) -> dict[str, Key]:
    """Schema keys generated from featx.options: one declaration per option."""
    from ..options import problem
    return {o.name: Key(o.kind, o.default, choices=o.choices,
                        check=(lambda v, o=o: problem(o, v)) if o.low is not None or o.high is not None else None)
            for o in options if o.table == table}


SCHEMA: dict[str, dict[str, Key]] = {
    "dataset": {
        "path": Key("str", REQUIRED, what="the dataset folder or CSV manifest (relative to this file), "
                                          "or featx:NAME for a dataset shipped with featx"),
        **_keys(DATASET, "dataset"),
        "label_regex": Key("str", None, check=_regex),
    },
    "backbones": {
        "name": Key("str", REQUIRED, choices=_backbone_names, what="a backbone (see `featx backbones`)"),
        "weights": Key("str", "auto"),
        "layers": Key("str_list", None, check=_non_empty),
        **_keys(EXTRACT, "backbones"),
    },
    "classifiers": {
        "names": Key("str_list", ["logreg"], choices=_classifier_names, check=_non_empty),
        "grids": Key("table", {}),
        **_keys(CLASSIFY, "classifiers"),
        "pca": Key("number", None, check=_pca),
        "features": Key("str_list", [], what="fused feature sets, each \"A+B\" with parts LAYER or BACKBONE:LAYER"),
    },
    "finetune": {
        "enabled": Key("bool", True),
        "backbone": Key("str", None, choices=_backbone_names),
        "weights": Key("str", None),
        **_keys(FINETUNE, "finetune"),
    },
    "evaluate": {
        "split": Key("str", "test", choices=("train", "val", "test", "all")),
        "top_k": Key("int", 5, check=_at_least(1)),
        "drop_leaks": Key("bool", False),
    },
    "report": {
        "title": Key("str", None),
        "max_misclassified": Key("int", 100, check=_at_least(0)),
    },
    "output": {
        "dir": Key("str", None),
        "cache": Key("str", None),
        "bundle": Key("str", "best.featx"),
    },
    "engine": {
        "kind": Key("str", "local", choices=("local", "dask")),
        "scheduler": Key("str", None),
        "shard_size": Key("int", None, check=_at_least(1)),
        **_keys(EXTRACT, "engine"),
        **_keys(CLASSIFY, "engine"),
    },
}
REQUIRED_TABLES = ("dataset", "backbones")
ARRAY_TABLES = ("backbones",)

_KIND_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "str_list": "a list of strings", "number": "a number", "table": "a table"}


def _type_word(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"


def _show(v) -> str:
    """A value as it would be written in TOML (short)."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{...}"
    text = json.dumps(v) if isinstance(v, list) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Where:
    """Builds the one-line messages: ``FILE: KEY: problem``."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")


def _suggest(word: str, allowed: Sequence[str]) -> str:
    from ..errors import did_you_mean
    hint = did_you_mean(word, allowed)
    return f" ({hint})" if hint else ""


def _check_type(where: _Where, dotted: str, spec: Key, v):
    kind = spec.kind
    ok = {
        "str": isinstance(v, str),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str_list": isinstance(v, list) and all(isinstance(x, str) for x in v),
        "table": isinstance(v, dict),
    }[kind]
    if not ok:
        if kind == "str_list" and isinstance(v, list):
            bad = next(i for i, x in enumerate(v) if not isinstance(x, str))
            raise where.error(f"{dotted}[{bad}]", f"expected a string, got {_type_word(v[bad])} ({_show(v[bad])})")
        raise where.error(dotted, f"expected {_KIND_WORDS[kind]}, got {_type_word(v)} ({_show(v)})")
    if kind == "float":
        v = float(v)
    if spec.check is not None:
        problem = spec.check(v)
        if problem:
            raise where.error(dotted, f"{_show(v)} {problem}")
    choices = spec.choices() if callable(spec.choices) else spec.choices
    if choices is not None:
        values = v if kind == "str_list" else [v]
        for i, x in enumerate(values):
            if x not in choices:
                at = f"{dotted}[{i}]" if kind == "str_list" else dotted
                raise where.error(at, f"{_show(x)} is not allowed{_suggest(x, choices)}; "
                                      f"use one of {', '.join(choices)}")
    return v


def _check_table(where: _Where, name: str, table, schema: dict[str, Key]) -> dict:
    if not isinstance(table, dict):
        raise where.error(name, f"expected a table ([{name}]), got {_type_word(table)} ({_show(table)})")
    for k in table:
        if k not in schema:
            raise where.error(f"{name}.{k}", f"unknown key{_suggest(k, schema)}; allowed: {', '.join(schema)}")
    out = {}
    for k, spec in schema.items():
        dotted = f"{name}.{k}"
        if k not in table:
            if spec.default is REQUIRED:
                raise where.error(dotted, f"missing; give {spec.what or _KIND_WORDS[spec.kind]}")
            out[k] = spec.default
            continue
        out[k] = _check_type(where, dotted, spec, table[k])
    return out
