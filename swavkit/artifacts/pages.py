"""The browsable pages swavkit leaves in an ``--out`` folder (cluster explorer, ``cluster --k``, ``assign``,
``neighbours``): static HTML that opens from disk (no server, no network), JPEG thumbnails, and the rule for
which ``--out`` folder such a command may write into (new, empty, or its own earlier output).

Names of images are shown in swavkit's printable form (``swavkit.data.names``) and HTML-escaped.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

from swavkit.data.names import printable_path
from swavkit.errors import DataError

PAGE_FILE = "index.html"
THUMBS_DIR = "thumbs"
# Longest side of the JPEG thumbnails written to out_dir/thumbs/ (the page shows them at 112 px).
THUMBNAIL_SIZE_PX = 128
# Up to this many thumbnails load with the page; the rest load lazily as they scroll into view, so a
# page for thousands of prototypes still opens quickly.
EAGER_THUMBNAILS = 2000


def check_output_folder(out_dir: Path, data_dir: str, *, output_names: tuple[str, ...], page_marker: str,
                        page_file: str = PAGE_FILE) -> None:
    """``--out`` must be new, empty, or an earlier output of the same command (recognised by ``page_marker``
    in its ``page_file``; it may hold ``output_names``), and outside the image folder (thumbnails there would
    become training images); refused with one line (DataError) otherwise. Each command (cluster explorer,
    ``cluster --k``, ``assign``, ``neighbours``) passes its own names and marker."""
    out, data = out_dir.resolve(), Path(data_dir).resolve()
    if out == data or data in out.parents:
        raise DataError(f"--out {printable_path(out_dir)} is inside the image folder {printable_path(data_dir)}: "
                        "its thumbnails would become images there; choose a folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a folder for the explorer's files")
    if not out_dir.is_dir():
        return
    entries = sorted(entry.name for entry in out_dir.iterdir())
    page = out_dir / page_file
    ours = page.is_file() and page_marker in page.read_text(encoding="utf-8", errors="replace")
    # an earlier output (recognised by its page) may be replaced; any other folder must be empty
    foreign = [name for name in entries if not (ours and name in output_names)]
    if foreign:
        raise DataError(f"--out {printable_path(out_dir)} holds files swavkit did not write "
                        f"({', '.join(printable_path(n) for n in foreign[:5])}); choose a new or empty folder")


# ----------------------------------------------------------------------------------------------------
# pages

def write_thumbnail(source: str, destination: Path) -> bool:
    """Small JPEG of ``source`` (longest side THUMBNAIL_SIZE_PX); False if it cannot be read any more."""
    from swavkit.data.images import UnreadableImage, read_rgb  # PIL: this module is read by `swavkit --help`

    try:
        image = read_rgb(source)
    except UnreadableImage:  # the file changed or vanished since assignment; the page shows its name instead
        return False
    image.thumbnail((THUMBNAIL_SIZE_PX, THUMBNAIL_SIZE_PX))
    image.save(destination, "JPEG", quality=85)
    return True


_PAGE_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 12px; }
table.summary td { padding: 2px 14px 2px 0; vertical-align: top; }
table.summary td:first-child { color: #666; }
.histogram { max-width: 100%; margin: 12px 0; border: 1px solid #ddd; background: white; }
nav { margin: 8px 0 20px; line-height: 2; }
nav a { display: inline-block; padding: 0 8px; margin: 0 4px 0 0; border-radius: 10px; background: #e4ecf6;
        color: #234; text-decoration: none; font-size: 12px; }
section.cluster { margin: 0 0 28px; }
section.cluster h2 { font-size: 16px; margin: 0 0 8px; }
section.cluster h2 small { color: #666; font-weight: normal; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)); gap: 8px; }
figure { margin: 0; background: white; border: 1px solid #ddd; padding: 4px; text-align: center; }
figure img { width: 112px; height: 112px; object-fit: contain; background: #eee; }
figcaption { font-size: 11px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
figcaption .confidence { font-weight: 600; }
.missing { display: flex; width: 112px; height: 112px; margin: auto; align-items: center; justify-content: center;
           background: #fdd; font-size: 11px; }
details { margin: 4px 0; }
"""

# Sets <body data-images-loaded="OK/TOTAL"> once the page has loaded: how many of the eagerly loaded
# images decoded. Lets a user (or an automated check) tell a broken page from a good one.
_PAGE_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img:not([loading=lazy])");
  var ok = 0;
  images.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { ok += 1; } });
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
});
"""


def _relative_href(path: str, page_dir: str | None) -> str | None:
    """Link from the page to an original image, relative (an absolute file:// link breaks as soon as the
    folder is zipped or moved); None when there is no relative path (no page folder, another drive)."""
    if page_dir is None:
        return None
    try:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir))
    except ValueError:
        return None
    return quote(os.fsencode(Path(relative).as_posix()))  # bytes: a non-UTF-8 name still gets a link


def page_head(title: str, marker: str) -> list[str]:
    """The opening lines of a swavkit thumbnail page up to ``<body>``: style, load check, ``marker`` (how a
    rerun recognises its own output folder); ``title`` is escaped here."""
    return ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', marker,
            f"<title>{html.escape(printable_path(title))}</title>", f"<style>{_PAGE_STYLE}</style>",
            f"<script>{_PAGE_SCRIPT}</script>", "</head>", "<body>"]


def thumbnail_figure(path: str, name: str, title: str, score: str, thumbnail: str | None, *,
                     page_dir: str | None, lazy: bool) -> str:
    """One ``<figure>`` of a thumbnail page: the thumbnail (a relative path; None = "unreadable" box)
    linked to the original ``path``, captioned "``score`` ``name``" (``score`` in bold), ``title`` on hover.
    Names are shown printable and HTML-escaped."""
    def esc(text: str) -> str:
        return html.escape(printable_path(text))

    if thumbnail is not None:
        loading = ' loading="lazy"' if lazy else ""
        picture = f'<img src="{esc(thumbnail)}" alt="{esc(name)}" title="{esc(title)}"{loading}>'
        href = _relative_href(path, page_dir)
        if href is not None:
            picture = f'<a href="{esc(href)}">{picture}</a>'
    else:
        picture = f'<div class="missing" title="{esc(title)}">unreadable</div>'
    return (f'<figure>{picture}<figcaption><span class="confidence">{esc(score)}</span> '
            f'{esc(name)}</figcaption></figure>')
