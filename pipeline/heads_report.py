"""Comparison table of the heads stage: text table, CSV bytes and PNG plots (Agg backend)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

COLUMNS = ("head", "inputs", "target", "accuracy", "macro_f1", "mAP", "rmse", "r2", "train_s",
           "rows")
NUMERIC = {"accuracy", "macro_f1", "mAP", "rmse", "r2", "train_s", "rows"}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


LEAK_COLUMNS = ("accuracy", "macro_f1", "mAP", "rmse", "r2")  # again with leaks (--exclude-leaks)


def format_table(rows: Sequence[Any]) -> str:
    """A fixed-width text table of ``COLUMNS`` (``-`` where a metric does not apply; the
    regression columns only when a row has them); with ``--exclude-leaks`` the metrics on
    every evaluation row follow, as ``... +leaks``."""
    shown = [c for c in COLUMNS if c not in ("rmse", "r2") or any(r.regression for r in rows)]
    leaks = any(getattr(r, "with_leaks", None) for r in rows)
    again = [c for c in shown if c in LEAK_COLUMNS] if leaks else []
    names = shown + [f"{c} +leaks" for c in again]
    cells = [[_cell(getattr(r, c)) for c in shown]
             + [_cell((r.with_leaks or {}).get(c, float("nan"))) for c in again] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(names)]
    numeric = [c.split()[0] in NUMERIC for c in names]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(names), line(["-" * w for w in widths])] + [line(c) for c in cells])


def csv_bytes(rows: Sequence[Any]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "notes"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        values = {c: getattr(r, c) for c in COLUMNS}
        w.writerow({**{c: ("" if isinstance(v, float) and math.isnan(v) else v)
                       for c, v in values.items()}, "notes": r.notes})
    return buf.getvalue().encode()


def _figure_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def bar_chart(rows: Sequence[Any], metric: str, title: str) -> bytes:
    """Horizontal bars of ``metric`` per row (rows without it are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if not math.isnan(getattr(r, metric))]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(shown) + 1.2))
    labels = [f"{r.head} [{r.inputs}] -> {r.target}" for r in shown]
    ax.barh(range(len(shown)), [getattr(r, metric) for r in shown], color="#4c72b0")
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min([0.0, *(getattr(r, metric) for r in shown)]), 1)
    ax.set_xlabel(f"{metric} (test split)")
    ax.set_title(title, fontsize=10)
    for i, r in enumerate(shown):
        v = getattr(r, metric)
        ax.text(v + 0.01, i, f"{v:.3f}", va="center", fontsize=7)
    return _figure_bytes(fig)


def confusion_plot(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.4 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    peak = max((max(r) for r in matrix), default=0)
    if len(classes) <= 30:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                            color="white" if v > peak / 2 else "black")
    return _figure_bytes(fig)
