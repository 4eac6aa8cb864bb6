"""Writing an inspection to a file: the format from the suffix, the file replaced atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RenderError

if TYPE_CHECKING:
    from .model import Inspection

_SUFFIXES = {".txt": "table", ".json": "json", ".dot": "dot", ".gv": "dot", ".svg": "svg", ".html": "html",
            ".htm": "html"}


def write(inspection: Inspection, path: str | os.PathLike, format: str | None) -> Path:
    """Write ``inspection`` rendered as ``format`` (else by suffix, else its own) so readers never see a
    partial file: a temporary file beside ``path`` is renamed over it."""
    path = Path(path)
    if format is None:
        if path.suffix and path.suffix.lower() not in _SUFFIXES:
            raise RenderError(f"cannot tell the format of {path.name!r} from its suffix", where=str(path),
                              fix=f"use one of {', '.join(_SUFFIXES)} or pass format=...")
        format = _SUFFIXES.get(path.suffix.lower(), inspection.format)
    text = inspection.render(format)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise RenderError(f"cannot write the inspection: {error.strerror or error}", where=str(path),
                          fix="check that the directory exists and is writable") from error
    return path
