"""What ``featx run`` prints at the end, and paths as the user reads them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from .schema import STAGES

if TYPE_CHECKING:
    from .stages import RunResult


def shown(path) -> str:
    """A path as the user reads it: relative to the working folder when inside it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


_NOUNS = {"extract": ("feature set", "feature sets"), "train": ("model", "models"),
          "finetune": ("fine-tuned model", "fine-tuned models"), "evaluate": ("evaluation", "evaluations"),
          "report": ("report", "reports")}


def _work_text(events, actions) -> str:
    parts = []
    for stage in STAGES:
        n = sum(1 for e in events if e.stage == stage and e.action in actions)
        if n:
            one, many = _NOUNS[stage]
            parts.append(f"{n} {one if n == 1 else many}")
    return ", ".join(parts) or "nothing"


def summary_lines(result: RunResult) -> list[str]:
    """What ``featx run`` prints at the end: best model, its test accuracy, where the report is, what was reused."""
    r = result.best["row"]
    m = result.metrics
    from ..classify import _fmt_value
    chosen = f"{r['param_name']}={_fmt_value(r['chosen'])}" if r.get("param_name") else ""
    score = r.get("val_or_cv_score")
    lines = [f"best model: {result.best['label']}" + (f" ({chosen})" if chosen else "")
             + (f", chosen by {r['score_source']} score {score:.4f}" if score is not None else "")]
    lines.append(f"{m.get('split', 'test')} accuracy: {m['accuracy']:.4f} ({m['n']} images), "
                 f"macro-F1 {m['macro']['f1']:.4f}")
    lines.append(f"report: {shown(result.report)}")
    lines.append(f"bundle: {shown(result.best['bundle'])}")
    lines.append(f"computed: {_work_text(result.events, ('computed',))}; "
                 f"reused: {_work_text(result.events, ('cached', 'reused'))} ({result.seconds:.1f} s)")
    return lines
