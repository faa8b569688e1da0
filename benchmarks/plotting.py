"""How the benchmarks save their plots (one size and resolution for docs/)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

DPI = 110


def save_figure(fig: Any, path: Path, legends: Iterable[Any] = ()) -> None:
    """Give each axes in `legends` a light grid and a small legend, lay the figure out, write
    it to `path` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    for ax in legends:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
