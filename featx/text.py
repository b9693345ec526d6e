"""Text helpers every module shares: aligned plain-text tables, and slugs for file names.

(The HTML table of reports is :func:`featx.report.html_table`.)
"""

from __future__ import annotations

import re
from typing import Collection, Sequence

__all__ = ["error_text", "slug", "text_table"]


def error_text(e: BaseException, limit: int = 160) -> str:
    """``"TypeName: first line of the message"`` (cut to ``limit``), for one-line errors."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


def text_table(rows: Sequence[Sequence], header: Sequence, right: Collection[int] = ()) -> str:
    """An aligned plain-text table: the header, a rule of dashes, the rows.

    Columns are two spaces apart, as wide as their widest cell, left-aligned
    except those whose index is in ``right``; no line ends in spaces.

    Examples
    --------
    >>> print(text_table([["a", 1], ["bcd", 22]], ["name", "n"], right={1}))
    name   n
    ----  --
    a      1
    bcd   22
    """
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).rjust(w) if j in right else str(c).ljust(w)
                         for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def slug(name: str, empty: str = "dataset") -> str:
    """``name`` made safe for a file name (``empty`` when nothing is left).

    >>> slug("my photos/2024"), slug("///", "x")
    ('my-photos-2024', 'x')
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or empty
