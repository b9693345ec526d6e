"""TOML out (``tomllib`` only reads): the resolved copy of a pipeline file."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Path):
        return json.dumps(str(v), ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_toml(data: dict, header: str = "") -> str:
    """Write ``data`` (tables of scalars, lists and sub-tables; lists of tables) as TOML."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def table(name: str, d: dict, array: bool = False):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_table_list(v)}
        if lines:
            lines.append("")
        lines.append(f"[[{name}]]" if array else f"[{name}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{name}.{_toml_key(k)}", v)
            elif _is_table_list(v):
                for item in v:
                    table(f"{name}.{_toml_key(k)}", item, array=True)

    for k, v in data.items():
        if isinstance(v, dict):
            table(_toml_key(k), v)
        elif _is_table_list(v):
            for item in v:
                table(_toml_key(k), item, array=True)
        else:
            raise TypeError(f"top-level {k!r} must be a table")
    return "\n".join(lines) + "\n"


def _is_table_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
