"""Files written atomically, and tensor files read safely: integrity checked before unpickling, weights-only.

torch's zip reader does not verify the CRC-32 its writer stores for every record, so flipped bytes in
a file written by torch.save load without a word and hand back different numbers. Every file fxreduce
reads with torch.load (its own saves, calibration inputs) goes through :func:`load_tensors`, which
checks each record's CRC first, then loads with ``weights_only=True`` (no code runs). :func:`digest`
states a tensor's exact contents, for files that carry their own digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import secrets
import warnings
import zipfile
from typing import Any, Iterator

import torch

from .errors import FxReduceError, InputError
from .text import first_sentence


def digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values: equal digests mean equal tensors, bit for bit."""
    data = tensor.detach().cpu().contiguous()
    hasher = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return hasher.hexdigest()


def _damaged_record(path: str) -> str | None:
    """The first record of a torch.save zip archive whose bytes fail their CRC-32, or None if all pass."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def load_tensors(path: str | os.PathLike, *, error: type[FxReduceError], what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on a file whose integrity was checked first.

    Any problem (missing, truncated, damaged, not a torch file, objects that would run code) raises
    ``error`` naming ``what`` the file is and the path; ``fix`` says how to get a good one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"no such {what} {path!r}", where=path, fix=fix)
    try:
        if zipfile.is_zipfile(path):
            damaged = _damaged_record(path)
            if damaged is not None:
                raise error(f"{what} {path!r} is damaged: the bytes of its record {damaged!r} do not match "
                            f"their checksum", where=path, fix=fix)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FxReduceError:
        raise
    except pickle.UnpicklingError as failure:
        lines = [line.strip() for line in str(failure).splitlines()]
        code = next((line for line in lines if "GLOBAL" in line), None)
        detail = code or next((line for line in lines if line.startswith("Unsupported")), "")
        held = ("it holds objects that would run code when loaded" if code else
                "it is corrupt, or a pickle that a weights-only load cannot read safely")
        raise error(f"refusing to load {what} {path!r}: {held}" + (f" ({detail})" if detail else ""),
                    where=path, fix=fix + "; never unpickle this file") from None
    except Exception as failure:
        raise error(f"{what} {path!r} is corrupt or truncated: {type(failure).__name__}: "
                    f"{first_sentence(failure)}", where=path, fix=fix) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file beside ``path`` that replaces it only once fully written: a reader sees the old file
    or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"cannot write {os.fspath(path)!r}: directory {directory!r} does not exist",
                         where="output path", fix="create the directory first or choose another path")
    # Created like any new file (mode 0o666 less the umask), and named after the target so that writers
    # that check the suffix (torch.export.save wants .pt2) accept it.
    temporary = os.path.join(directory, f".fxreduce-{secrets.token_hex(6)}-{os.path.basename(path)}")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
