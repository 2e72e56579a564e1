"""Fetch a file from a list of mirrors, verify its checksum, and move it into place atomically."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import DataError

_CHUNK = 1 << 16


def md5sum(path: str | os.PathLike) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str, *, timeout: float, progress: bool) -> None:
    """Download `url` to `dest` or raise DataError; `dest` never holds an unverified file."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DataError(f"{url}: truncated download ({received} of {total} bytes)")
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: checksum mismatch (md5 {digest.hexdigest()}, expected {md5})")
        os.replace(tmp, dest)
    except http.client.IncompleteRead as e:
        raise DataError(f"{url}: truncated download ({len(e.partial)} bytes then the connection closed)") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"{url}: {reason}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def download(
    filename: str,
    md5: str,
    mirrors: Sequence[str],
    dest_dir: str | os.PathLike,
    *,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download `filename` from the first mirror that serves it with the right MD5.

    Args:
        filename: the name on the mirror and on disk.
        md5: the checksum the dataset's authors published for the file.
        mirrors: base URLs, tried in order.
        dest_dir: where the file goes; created if missing.

    Returns:
        The path of the verified file.

    Raises:
        DataError: no mirror gave a good copy; the message lists what each one did.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    failures = []
    for mirror in mirrors:
        try:
            _fetch(mirror.rstrip("/") + "/" + filename, dest, md5, timeout=timeout, progress=progress)
            return dest
        except DataError as e:
            failures.append(str(e))
    raise DataError("; ".join(failures) or f"no mirror configured for {filename}")
