"""Deck content: curves (matplotlib PNGs embedded as HTML) and tables. No math here."""

from __future__ import annotations

import base64
import io

import pandas as pd


def curves_html(metrics: pd.DataFrame, columns: list[str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in columns if c in metrics.columns]
    if not cols or metrics.empty:
        return f"<p>{title}: no metrics</p>"
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3), squeeze=False)
    for ax, col in zip(axes[0], cols):
        ax.plot(metrics["step"] if "step" in metrics else range(len(metrics)), metrics[col], marker=".")
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def table_html(df: pd.DataFrame, max_rows: int = 50) -> str:
    return df.head(max_rows).to_html(index=False)
