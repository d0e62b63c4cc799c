"""Exports to object stores: ``svdfill fill --out s3://bucket/recs.parquet`` or
``--out s3://bucket/recs/`` (``gs://``, ``hdfs://``, any ``pyarrow.fs`` URI).

An object store has no rename and no append, so the export is not written there block by
block. It is built in a local staging folder, exactly as a local ``--out`` is (resumable
block by block: a killed export rerun with the same command resumes there), and then
published through ``pyarrow.fs``: each finished file is uploaded whole, and an object only
becomes visible when its upload completes. A dataset's parts go first, each uploaded by the
rank that wrote it, and ``_manifest.json`` last, by rank 0, after every rank's upload: as on
a local disk, a reader of the bucket sees a complete dataset or none. The old manifest of the
prefix is deleted before the export starts, so no reader pairs it with new parts.

The staging folder is ``$SVDFILL_STAGING`` (default ``~/.cache/svdfill/staging``) /
``sha256(URI)[:16]``: the same URI on the same machine resumes in the same place. It is
removed once the publication is complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from svdfill.errors import UserError

MANIFEST = "_manifest.json"
_CHUNK = 8 << 20


def is_remote(out: str | os.PathLike) -> bool:
    """``out`` is a URI other than ``file://`` (those are written like local paths)."""
    from svdfill.data.sources import is_uri

    s = os.fspath(out)
    return is_uri(s) and not s.lower().startswith("file://")


def staging_root() -> Path:
    return Path(os.environ.get("SVDFILL_STAGING") or Path.home() / ".cache" / "svdfill" / "staging")


def staging_path(uri: str) -> Path:
    """The local twin of ``uri`` (a file, or a folder when ``uri`` ends with ``/``)."""
    from svdfill.data.sources import redact_uri

    bare = redact_uri(uri)
    key = hashlib.sha256(bare.encode()).hexdigest()[:16]
    name = bare.rstrip("/").rsplit("/", 1)[-1] or "export"
    return staging_root() / key / name


def local_out(uri: str) -> str:
    """What the exporters write to for ``uri``: the staging path, with the trailing ``/``
    of a dataset kept (``is_dataset_path`` reads it)."""
    p = staging_path(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    return str(p) + ("/" if uri.endswith("/") else "")


class Target:
    """A remote export location: ``fs`` (a ``pyarrow.fs`` filesystem) and ``path`` on it.
    Every failure to reach it is a :class:`UserError` naming the URI (never its query, which
    may hold secrets)."""

    def __init__(self, uri: str):
        from svdfill.data.sources import open_filesystem, redact_uri

        self.uri, self.shown = uri, redact_uri(uri)
        self.dataset = uri.endswith("/")
        try:
            self.fs, path = open_filesystem(uri)
        except (ValueError, OSError) as e:
            raise UserError(f"--out {self.shown}: cannot open this location: {e}") from None
        self.path = path.rstrip("/")

    def _fail(self, what: str, e: Exception) -> UserError:
        return UserError(f"--out {self.shown}: {what} failed: {e}")

    def prepare(self, *, restart: bool) -> None:
        """Before the export (rank 0): the prefix exists and holds nothing but an svdfill
        dataset (``restart``: its objects are deleted), and its manifest is gone."""
        import pyarrow.fs as pafs

        from svdfill.fill.dataset import _OURS_RE

        try:
            if not self.dataset:
                parent = self.path.rsplit("/", 1)[0]
                if parent and parent != self.path:
                    self.fs.create_dir(parent, recursive=True)
                return
            self.fs.create_dir(self.path, recursive=True)
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            names = [i.base_name for i in infos]
            foreign = sorted(n for n in names if not _OURS_RE.match(n))
            if foreign:
                raise UserError(f"--out {self.shown}: holds objects that are not part of an svdfill "
                                f"dataset ({', '.join(foreign[:3])}); give an empty or new prefix")
            for i in infos:
                if i.base_name == MANIFEST or (restart and i.type == pafs.FileType.File):
                    self.fs.delete_file(i.path)
        except OSError as e:
            raise self._fail("preparing the location", e) from None

    def upload(self, local: Path, name: str | None = None) -> int:
        """Copy ``local`` to the target (``name`` inside a dataset prefix); returns bytes."""
        dest = self.path if name is None else f"{self.path}/{name}"
        sent = 0
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(dest) as sink:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    sink.write(chunk)
                    sent += len(chunk)
        except OSError as e:
            raise self._fail(f"uploading {local.name}", e) from None
        return sent

    def delete_stale_parts(self, parts: int) -> None:
        """Parts ``>= parts`` left by an earlier, larger dataset under the prefix."""
        import pyarrow.fs as pafs

        from svdfill.fill.dataset import _PART_RE

        try:
            for i in self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
                m = _PART_RE.match(i.base_name)
                if m and int(m.group(1)) >= parts:
                    self.fs.delete_file(i.path)
        except OSError as e:
            raise self._fail("removing stale parts", e) from None


def publish(target: Target, staged: str, *, rank: int = 0, size: int = 1, barrier=None) -> int:
    """Upload a finished export from its staging path ``staged`` (:func:`local_out`): a file;
    or this rank's part of a dataset, then (rank 0, after ``barrier()`` — every rank's upload
    done) the manifest. Removes the staging copy once published; returns bytes sent."""
    from svdfill.fill.dataset import part_name

    local = Path(staged)
    if not target.dataset:
        sent = target.upload(local)
        _drop(local)
        return sent
    sent = target.upload(local / part_name(rank), part_name(rank))
    if barrier is not None:
        barrier()
    if rank == 0:
        target.delete_stale_parts(size)
        sent += target.upload(local / MANIFEST, MANIFEST)
    if barrier is not None:
        barrier()  # no rank deletes the staging folder while rank 0 still reads the manifest
    if rank == 0:
        _drop(local)
    return sent


def _drop(local: Path) -> None:
    shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
    try:
        local.parent.rmdir()  # the URI's key folder, when empty
    except OSError:
        pass
