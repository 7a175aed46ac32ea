"""Figures of results (matplotlib, imported lazily: `pip install 'neardup[plot]'`)."""

from __future__ import annotations

import os

from .images import load_image
from .index import NeardupError


def plot_query(query: str | os.PathLike, matches: list[tuple[str, float]], out: str | os.PathLike,
               columns: int = 5) -> None:
    """The seed's figure: the query image, then its matches with their cosine scores in the titles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise NeardupError("writing a figure needs matplotlib: pip install 'neardup[plot]'") from exc
    panels = [(query, "query")] + [(path, f"{score:.3f}") for path, score in matches]
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, title) in zip(axes.flat, panels):
        image = load_image(path, min_side=256).image
        image.thumbnail((384, 384))
        ax.imshow(image)
        ax.set_title(f"{title}\n{os.path.basename(path)[:32]}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
