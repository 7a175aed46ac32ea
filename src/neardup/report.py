"""Figures and reports of results: the query figure (matplotlib, imported lazily: `pip install 'neardup[plot]'`)
and the self-contained HTML gallery of duplicate groups (Pillow only)."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from urllib.parse import quote

from .images import ImageError, load_image
from .index import DEFAULT_THRESHOLD, Index, NeardupError


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


@dataclass
class ReportSummary:
    out: Path
    groups: int
    files: int
    unreadable: int
    thumbs_dir: Path | None


def html_report(index: Index, out: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD, *, exact: bool = False,
                thumb_size: int = 200, thumbs_beside: bool = False, max_groups: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> ReportSummary:
    """Write a static HTML gallery of the duplicate groups that opens from disk with no server and no
    network: thumbnails embedded as data: URIs (one file to mail), or with `thumbs_beside` written as
    JPEGs into <out stem>_thumbs/ next to it (smaller HTML for big collections)."""
    from .web.thumbnails import thumbnail_jpeg

    out = Path(out)
    groups = index.duplicates(threshold, exact=exact)
    total_groups = len(groups)
    groups = groups[:max_groups] if max_groups is not None else groups
    thumbs_dir = out.with_name(f"{out.stem}_thumbs") if thumbs_beside else None
    if thumbs_dir:
        thumbs_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(g.ids) for g in groups)
    done = unreadable = 0
    sections = []
    for number, group in enumerate(groups, 1):
        figures = []
        for image_id in group.ids:
            record = index.image(image_id)
            if record is None:  # removed by a writer since duplicates() ran
                continue
            name = os.path.basename(record.path)
            try:
                jpeg = thumbnail_jpeg(record.path, thumb_size)
            except ImageError as exc:
                unreadable += 1
                picture = f'<div class="missing">cannot read: {escape(exc.reason)}</div>'
            else:
                if thumbs_dir:
                    (thumbs_dir / f"{image_id}.jpg").write_bytes(jpeg)
                    src = f"{quote(thumbs_dir.name)}/{image_id}.jpg"
                else:
                    src = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
                picture = f'<img src="{src}" alt="{escape(name)}" loading="lazy">'
            dims = f"{record.width}×{record.height}" if record.width else "?"
            figures.append(
                f'<figure><a href="{escape(Path(record.path).as_uri())}">{picture}</a><figcaption>'
                f'<strong>{escape(name)}</strong><br>{dims} px · {_size(record.size)}'
                f'<br><span class="path">{escape(record.path)}</span></figcaption></figure>')
            done += 1
            if progress:
                progress(done, total)
        sections.append(
            f'<section id="group-{number}"><h2>Group {number}: {len(group.ids)} files, copy probability '
            f'{group.min_score:.3f}–{group.max_score:.3f}, cosine {group.min_cosine:.3f}–{group.max_cosine:.3f}</h2><div class="grid">{"".join(figures)}</div></section>')
    shown = f"the first {len(groups)} of {total_groups}" if len(groups) < total_groups else f"{total_groups}"
    stats = index.stats()
    document = _REPORT_TEMPLATE.format(
        title=escape(f"neardup report: {total_groups} duplicate groups"),
        summary=escape(f"{shown} groups of near-duplicate images ({total} files) among {stats['images']} indexed "
                       f"images, copy probability >= {threshold}, index {stats['index']}, "
                       f"written {time.strftime('%Y-%m-%d %H:%M %Z')}."),
        body="\n".join(sections) or "<p>No duplicates at this threshold.</p>")
    out.write_text(document, encoding="utf-8")
    return ReportSummary(out, len(groups), total, unreadable, thumbs_dir)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


_REPORT_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1f24; background: #fff; line-height: 1.4; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.05rem; margin: 1.5rem 0 0.5rem; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 0.8rem; }}
figure {{ margin: 0; border: 1px solid #d0d7de; border-radius: 8px; padding: 0.5rem; }}
img {{ width: 100%; height: 200px; object-fit: contain; background: #f4f6f8; }}
figcaption {{ font-size: 0.85rem; margin-top: 0.3rem; }}
.path {{ color: #57606a; font-size: 0.75rem; overflow-wrap: anywhere; }}
.missing {{ height: 200px; display: flex; align-items: center; justify-content: center; color: #a40e26; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
{body}
</body>
</html>
"""
