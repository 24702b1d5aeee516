"""Plots of research answers (matplotlib: ``pip install 'ern-registry-client[plot]'``)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .frames import TOTAL


def plot_diagnostic_delay(
    frame: pd.DataFrame,
    ax: Any = None,
    *,
    title: str | None = None,
    include_total: bool = True,
) -> Any:
    """Horizontal 100 % stacked bars of a :meth:`Client.diagnostic_delay` frame: per
    group, the share of patients in each delay band, with the median (years) written
    at the bar's end. A group with a suppressed band is drawn hatched and grey, with no
    shares: they cannot be computed without the hidden counts, and are not guessed.
    Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    bands = list(frame.attrs.get("bands") or [c for c in frame.columns if c.endswith("y")])
    data = frame if include_total else frame.drop(index=TOTAL, errors="ignore")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 * len(data) + 1.5))
    labels = [" / ".join(k) if isinstance(k, tuple) else str(k) for k in data.index]
    colours = plt.get_cmap("viridis")(
        [i / max(1, len(bands) - 1) for i in range(len(bands))]
    )
    for y, (key, row) in enumerate(data.iterrows()):
        counts = row[bands]
        if counts.isna().any() or pd.isna(row[TOTAL]) or row[TOTAL] == 0:
            ax.barh(y, 1.0, color="lightgrey", hatch="//", edgecolor="grey")
            ax.text(0.5, y, "suppressed", ha="center", va="center", fontsize=8)
            continue
        left = 0.0
        total = float(sum(int(c) for c in counts))
        for band, colour in zip(bands, colours):
            share = int(row[band]) / total
            ax.barh(y, share, left=left, color=colour, label=band if y == 0 else None)
            left += share
        median = row.get("median_years")
        if median is not None and not pd.isna(median):
            ax.text(1.01, y, f"median {median:.1f} y", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of patients")
    dims = frame.attrs.get("dimensions") or []
    if dims:
        ax.set_ylabel(" / ".join(dims))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    ax.legend(
        handles, bands, title="delay from onset to diagnosis", loc="upper center",
        bbox_to_anchor=(0.5, -0.12), ncol=len(bands), fontsize=8, frameon=False,
    )
    k = frame.attrs.get("min_cell_count")
    as_of = frame.attrs.get("as_of")
    note = f"{frame.attrs.get('registry', '')}; counts below k={k} suppressed"
    if as_of is not None:
        note += f"; consent as of {as_of:%Y-%m-%d %H:%M} UTC"
    ax.set_title(title or "Diagnostic delay", loc="left", pad=14)
    ax.text(1.0, 1.01, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    return ax
