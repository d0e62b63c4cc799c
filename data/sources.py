"""Where ratings come from: a path, folder, glob or URI resolved to its part files.

A ratings dataset is rarely one file: Spark, Hive and Ray write a folder of part files, often
in ``key=value`` partition folders, on s3, gs or hdfs, and text datasets ship compressed
(``ratings.csv.gz``). :func:`resolve` turns what the user wrote into an ordered list of
:class:`Part` s, each readable through ``pyarrow.fs`` with transparent decompression, so the
readers never care where the bytes live.

Accepted: a file; a directory (walked recursively; ``_SUCCESS``, ``_metadata``, ``.crc`` and
other names starting with ``_`` or ``.`` are bookkeeping, not data, as Spark and Hive treat
them); a glob (``data/part-*.parquet``, ``**`` recursive); a URI with a scheme pyarrow knows
(``file://``, ``s3://``, ``gs://``, ``hdfs://``). Credentials and endpoints come from the usual
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, …)
or the URI's query (``s3://bucket/key?endpoint_override=…``), as pyarrow reads them; messages
show the URI without its query, so no secret is ever printed.

Parts are sorted by path, so every process that resolves the same source sees the same
parts in the same order (the per-rank reading of a world relies on it).
"""

from __future__ import annotations

import glob as globlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from svdfill.data.errors import DataError

COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd",
                       ".lz4": "lz4"}
"""File endings decompressed on the fly (pyarrow's codecs), and their codec names."""

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")
_PARTITION = re.compile(r"^([^=/]+)=([^/]*)$")


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://…`` (s3, gs, hdfs, file, …), False for a plain local path."""
    return bool(_URI.match(str(path)))


def redact_uri(uri: str) -> str:
    # the query may carry secrets (access keys, session tokens): never show it
    return uri.split("?", 1)[0]


def open_filesystem(uri: str):
    """``(filesystem, path on it)`` of a URI to write to: ``pyarrow.fs.FileSystem.from_uri``,
    except for an ``s3://`` URI without query options while this process's environment holds
    AWS keys: then an ``S3FileSystem`` with those keys (and ``AWS_ENDPOINT_URL[_S3]``, the
    region) set explicitly. A filesystem built from the environment is pickled without its
    credentials, so processes it is handed to (Ray's controller and workers, started by the
    cluster with environments of their own) would write anonymously. Raises what
    ``from_uri`` raises (ValueError, OSError)."""
    import pyarrow.fs as pafs

    env = os.environ
    if not uri.lower().startswith("s3://") or "?" in uri or not env.get("AWS_ACCESS_KEY_ID"):
        return pafs.FileSystem.from_uri(uri)
    kw = {"access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env.get("AWS_SECRET_ACCESS_KEY", ""),
          "session_token": env.get("AWS_SESSION_TOKEN")}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw), uri.split("://", 1)[1]


def fetch_run(uri: str, names: Sequence[str], *, required: str) -> Path:
    """A run directory (or its ``model.pt``) on an object store, as a local folder: the
    files ``names`` that exist under ``uri`` are copied into
    ``$SVDFILL_CACHE`` (default ``~/.cache/svdfill``) ``/runs/sha256(URI)[:16]/`` — again only
    when their size or modification time changed — and the folder is returned. ``required``:
    the one name that must exist (else a :class:`DataError` naming the URI). Anything the
    store refuses is a DataError naming the URI without its query."""
    import hashlib

    import pyarrow.fs as pafs

    shown = redact_uri(uri)
    try:
        fs, path = open_filesystem(uri)
    except (ValueError, OSError) as e:
        raise DataError(f"{shown}: cannot open this location: {e}") from None
    path = path.rstrip("/")
    if path.endswith("/" + required):
        path = path[: -len(required) - 1]
        shown = shown.rstrip("/")[: -len(required) - 1]
    root = Path(os.environ.get("SVDFILL_CACHE") or Path.home() / ".cache" / "svdfill")
    local = root / "runs" / hashlib.sha256(shown.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    try:
        infos = {i.base_name: i for i in fs.get_file_info([f"{path}/{n}" for n in names])
                 if i.type == pafs.FileType.File}
        if required not in infos:
            raise DataError(f"{shown.rstrip('/')}/{required}: not found")
        for name, info in infos.items():
            dest = local / name
            stamp = local / f".{name}.stamp"
            key = f"{info.size} {info.mtime_ns}"
            if dest.is_file() and stamp.is_file() and stamp.read_text() == key:
                continue
            tmp = local / f".{name}.tmp"
            with fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
            stamp.write_text(key)
    except OSError as e:
        raise DataError(f"{shown}: reading the run failed: {e}") from None
    return local


@dataclass(frozen=True)
class Part:
    """One file of a ratings dataset.

    fs: the ``pyarrow.fs.FileSystem`` it is read through; path: its path on ``fs``;
    display: how messages name it (a local path, or the URI without its query); size: bytes
    on storage (compressed; of the whole file even with ``row_groups``); partition:
    ``key=value`` folder segments between the dataset's root and the file (Hive-style), in
    order.
    """

    fs: Any
    path: str
    display: str
    size: int
    partition: tuple[tuple[str, str], ...] = field(default=())
    row_groups: tuple[int, int] | None = None
    """Parquet only: read just row groups ``[lo, hi)`` (a rank's share of a large file)."""
    share_bytes: int | None = None
    """With ``row_groups``: the compressed bytes of those row groups (what reading them costs)."""

    @property
    def bytes_to_read(self) -> int:
        """Bytes on storage this part (or row-group share of a file) reads."""
        return self.size if self.share_bytes is None else self.share_bytes

    @property
    def name(self) -> str:
        """The file name without a compression suffix (``ratings.csv.gz`` → ``ratings.csv``)."""
        base = self.path.rsplit("/", 1)[-1]
        suffix = os.path.splitext(base)[1].lower()
        return base[: -len(suffix)] if suffix in COMPRESSED_SUFFIXES else base

    @property
    def compression(self) -> str | None:
        """The codec the file is decompressed with, or None."""
        return COMPRESSED_SUFFIXES.get(os.path.splitext(self.path)[1].lower())

    def open(self):
        """A binary input stream of the file's (decompressed) bytes; close it after use."""
        try:
            raw = self.fs.open_input_stream(self.path, compression=None)
        except OSError as e:
            raise DataError(f"{self.display}: cannot open: {e}") from None
        codec = self.compression
        if codec is None:
            return raw
        import pyarrow as pa

        try:
            return pa.CompressedInputStream(raw, codec)
        except (pa.ArrowNotImplementedError, ValueError) as e:
            raw.close()
            raise DataError(f"{self.display}: this pyarrow cannot decompress {codec}: {e}") from None

    def read_head(self, n: int = 1 << 16) -> bytes:
        """The first ``n`` decompressed bytes (fewer for a shorter file)."""
        import pyarrow as pa

        with self.open() as f:
            try:
                return f.read(n)
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{self.display}: cannot read ({self.compression or 'file'}): "
                                f"{e}") from None

    def read_all(self) -> bytes:
        """Every decompressed byte of the file."""
        import pyarrow as pa

        with self.open() as f:
            try:
                return f.read()
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{self.display}: cannot read ({self.compression or 'file'}): "
                                f"{e}") from None


def _is_data_name(name: str) -> bool:
    return not (name.startswith("_") or name.startswith(".") or name.endswith(".crc"))


def _partition_of(rel: str) -> tuple[tuple[str, str], ...]:
    """``key=value`` segments of the folders in ``rel`` (a path relative to the root)."""
    out = []
    for seg in rel.split("/")[:-1]:
        m = _PARTITION.match(seg)
        if m:
            out.append((m.group(1), m.group(2)))
    return tuple(out)


def _filesystem(source: str):
    """(filesystem, path on it, display prefix function) for a URI or a local path."""
    import pyarrow.fs as pafs

    if is_uri(source):
        try:
            fs, path = pafs.FileSystem.from_uri(source)
        except (ValueError, OSError) as e:  # unknown scheme, no bucket, bad endpoint …
            raise DataError(f"{redact_uri(source)}: cannot open this location: {e}") from None
        scheme = source.split("://", 1)[0].lower()
        if scheme == "file":
            return fs, path, lambda p: p
        bare = redact_uri(source)
        # messages show the URI as written, so the user recognizes it
        root = bare[: len(bare) - len(bare.split("://", 1)[1])]
        return fs, path, lambda p, root=root: root + p.lstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source)), lambda p: p


def resolve(source: str | os.PathLike) -> list[Part]:
    """The data files of ``source`` (file, directory, glob or URI), sorted by path.

    Raises :class:`DataError` naming ``source`` when nothing is there, a glob or folder
    matches no data file, or the storage cannot be reached.
    """
    import pyarrow.fs as pafs

    text = str(source)
    shown = redact_uri(text)
    fs, path, display = _filesystem(text)
    local = isinstance(fs, pafs.LocalFileSystem)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DataError(f"{shown}: cannot reach the storage: {e}") from None
    if info.type == pafs.FileType.File:
        rel_display = display(path) if is_uri(text) else (text if not local else str(Path(text)))
        return [Part(fs, path, rel_display, int(info.size or 0))]
    if info.type == pafs.FileType.Directory:
        return _walk(fs, path, display, shown)
    if _GLOB_CHARS.search(path):
        return _glob(fs, path, display, shown, local)
    raise DataError(f"{shown}: no such file or directory")


def _walk(fs, root: str, display, shown: str) -> list[Part]:
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise DataError(f"{shown}: cannot list the folder: {e}") from None
    root = root.rstrip("/")
    parts = []
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        rel = fi.path[len(root):].lstrip("/")
        # a bookkeeping file or anything inside a hidden/underscore folder (_temporary/)
        if not all(_is_data_name(seg) for seg in rel.split("/")):
            continue
        parts.append(Part(fs, fi.path, display(fi.path), int(fi.size or 0), _partition_of(rel)))
    if not parts:
        raise DataError(f"{shown}: the directory holds no data files (names starting with _ or . are skipped)")
    return sorted(parts, key=lambda p: p.path)


def _glob(fs, pattern: str, display, shown: str, local: bool) -> list[Part]:
    import pyarrow.fs as pafs

    # the folder above the first wildcard is listed; the rest is matched segment-wise
    segs = pattern.split("/")
    fixed = next(i for i, s in enumerate(segs) if _GLOB_CHARS.search(s))
    base = "/".join(segs[:fixed]) or "/"
    if local:
        hits = sorted(globlib.glob(pattern, recursive=True))
        files = [(h, os.path.getsize(h)) for h in hits if os.path.isfile(h)]
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as e:
            raise DataError(f"{shown}: cannot list {base}: {e}") from None
        rx = re.compile(_glob_regex(pattern))
        files = [(fi.path, int(fi.size or 0)) for fi in infos
                 if fi.type == pafs.FileType.File and rx.fullmatch(fi.path)]
    parts = []
    for p, size in files:
        rel = p[len(base):].lstrip("/")
        if all(_is_data_name(seg) for seg in rel.split("/")):
            parts.append(Part(fs, p, display(p), size, _partition_of(rel)))
    if not parts:
        raise DataError(f"{shown}: the pattern matches no data file")
    return sorted(parts, key=lambda p: p.path)


def _glob_regex(pattern: str) -> str:
    """A regex for a ``/``-separated glob: ``*`` and ``?`` stay inside a segment, ``**``
    spans folders (as :mod:`glob` with ``recursive=True``), ``[…]`` is a class."""
    segs = pattern.split("/")
    rx = ""
    for n, seg in enumerate(segs):
        last = n == len(segs) - 1
        if seg == "**":
            rx += ".*" if last else "(?:[^/]+/)*"
            continue
        i = 0
        while i < len(seg):
            c = seg[i]
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif c == "[" and "]" in seg[i + 1:]:
                j = seg.index("]", i + 2 if seg[i + 1:i + 2] in ("!", "]") else i + 1)
                body = seg[i + 1:j]
                rx += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                i = j
            else:
                rx += re.escape(c)
            i += 1
        rx += "" if last else "/"
    return rx


_PARQUET_NAMES = (".parquet", ".pq", ".parq")


def _units(parts: Sequence[Part]) -> list[tuple[Part, int]]:
    """The dataset cut into (unit, bytes): a Parquet file's row groups each, a text file
    whole (it has no index to start reading in the middle of)."""
    import pyarrow.parquet as pq

    out: list[tuple[Part, int]] = []
    for p in parts:
        if p.compression is None and p.name.lower().endswith(_PARQUET_NAMES) and p.size > 0:
            try:
                with p.fs.open_input_file(p.path) as h:
                    meta = pq.ParquetFile(h).metadata
                    sizes = [sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
                             for rg in map(meta.row_group, range(meta.num_row_groups))]
            except OSError as e:
                raise DataError(f"{p.display}: cannot read the Parquet footer: {e}") from None
            except Exception:  # not Parquet after all: the reader says why, as a whole unit
                sizes = None
            if sizes:
                out.extend((replace(p, row_groups=(g, g + 1), share_bytes=int(s)), max(int(s), 1))
                           for g, s in enumerate(sizes))
                continue
        out.append((p, max(p.size, 1)))
    return out


def share(parts: Sequence[Part], rank: int, world_size: int) -> list[Part]:
    """Rank ``rank``'s contiguous share of ``parts``, balanced by bytes over Parquet row
    groups and whole text files: every rank computes the same cut from the same sorted
    parts, so the shares are disjoint, cover the dataset, and rank r's rows precede rank
    r+1's in the dataset's order."""
    units = _units(parts)
    total = sum(w for _, w in units)
    mine: list[Part] = []
    done = 0
    for u, w in units:
        # the unit goes to the rank whose byte range holds its middle
        owner = min(world_size - 1, int(world_size * (done + w / 2) / total))
        done += w
        if owner != rank:
            continue
        last = mine[-1] if mine else None
        if (last is not None and u.row_groups is not None and last.row_groups is not None
                and last.path == u.path and last.row_groups[1] == u.row_groups[0]):
            mine[-1] = replace(last, row_groups=(last.row_groups[0], u.row_groups[1]),
                               share_bytes=last.share_bytes + u.share_bytes)
        else:
            mine.append(u)
    return mine
