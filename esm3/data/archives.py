"""Tar archives as inputs, read member by member in place (never unpacked to disk).

Databases ship bundles: JGI/IMG one `<taxon_oid>.tar.gz` per genome with
`<taxon_oid>.genes.faa` (the proteins) beside nucleotide and annotation files; AlphaFold DB
uncompressed `.tar` archives (proteomes, Swiss-Prot) of gzipped mmCIF/PDB models; the ESM
Atlas `.tar.gz` bundles of 500k-1M gzipped PDB files each. `iter_members` walks such an archive
once, hands out one member at a time as a file object (gzip members are left to the caller,
which decompresses them on the fly), and keeps no list of members: memory follows one member,
not the archive. Uncompressed archives are walked with seeks past the members a reader does
not want; compressed ones are decompressed in one forward pass.

Selection: members are chosen by glob patterns on their base name (`fnmatch`, case
insensitive). `part`/`parts` split one archive between array tasks: the selected members
are numbered in archive order and task `part` takes those whose number % parts == part, so
every task walks the archive's headers but reads only its own members.

Damage: a truncated or corrupt archive raises `ArchiveError` naming the archive and the member
being read (or the last complete one), whether it shows while walking the headers or while a
member is read. Python's tarfile treats a short or unreadable header after the first as the
end of the archive; here the end must be the tar end-of-archive marker (a zero block), else
the archive counts as truncated.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import lzma
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# what a FASTA archive contributes by default: protein FASTA (JGI/IMG's `.genes.faa`), not
# the nucleotide `.fna` or the annotation tables beside it
FASTA_MEMBERS = ("*.faa", "*.faa.gz", "*.fasta", "*.fasta.gz")
STRUCTURE_MEMBERS = tuple(
    f"*{ext}{gz}" for ext in (".cif", ".mmcif", ".bcif", ".pdb", ".ent") for gz in ("", ".gz")
)
_BLOCK = tarfile.BLOCKSIZE


class ArchiveError(ValueError):
    """A truncated or corrupt archive; names the archive and the member where it broke."""

    def __init__(self, archive: str | Path, member: str | None, detail: str) -> None:
        where = f" at member {member}" if member else ""
        super().__init__(f"{archive}: truncated or corrupt archive{where}: {detail}")
        self.archive = str(archive)
        self.member = member
        self.detail = detail


def is_archive(path: str | Path) -> bool:
    """True when the name says tar archive (plain or gzip/bzip2/xz compressed)."""
    name = Path(path).name.lower()
    return name.endswith(ARCHIVE_SUFFIXES)


def member_matcher(patterns: Sequence[str]):  # type: ignore[no-untyped-def]
    """A predicate on member names: the base name matches one of the globs."""
    pats = [p.lower() for p in patterns]

    def match(name: str) -> bool:
        base = name.rsplit("/", 1)[-1].lower()
        return any(fnmatch.fnmatchcase(base, p) for p in pats)

    return match


@dataclass(frozen=True)
class ArchivePart:
    """One array task's share of an archive: the selected members numbered `part` modulo
    `parts`. `members`: globs of member names to read (empty: the reader's default)."""

    path: str
    part: int = 0
    parts: int = 1
    members: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.path if self.parts == 1 else f"{self.path} (part {self.part + 1}/{self.parts})"


@dataclass
class Member:
    """One selected member while it is current: `open()` gives its bytes (as stored: a
    gzip member stays gzip) and is valid until the walk moves on."""

    archive: str
    name: str
    size: int
    index: int  # among the selected members, in archive order
    _tar: tarfile.TarFile
    _info: tarfile.TarInfo

    @property
    def source(self) -> str:
        """How rows and rejects name it: `<archive>:<member>`."""
        return f"{self.archive}:{self.name}"

    def open(self) -> io.BufferedReader:
        raw = self._tar.extractfile(self._info)
        if raw is None:  # not a regular file; iter_members hands out regular files only
            raise ArchiveError(self.archive, self.name, "member is not a regular file")
        return io.BufferedReader(_Guarded(raw, self.archive, self.name), 1 << 20)

    def read(self) -> bytes:
        with self.open() as f:
            return f.read()


@dataclass
class WalkStats:
    """What a walk saw besides the members it handed out."""

    members: int = 0  # regular files in the archive (all parts)
    selected: int = 0  # of those, matching the globs (all parts)
    skipped: int = 0  # regular files not matching the globs
    skipped_names: list[str] = field(default_factory=list)  # the first `keep_skipped` of them
    keep_skipped: int | None = 10  # None: every name


class _Guarded(io.RawIOBase):
    """A member's stream whose read errors (the archive ends inside the member, bad
    compressed data) become ArchiveError naming the archive and the member."""

    def __init__(self, raw: IO[bytes], archive: str, member: str) -> None:
        self._raw, self._archive, self._member = raw, archive, member

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        try:
            data = self._raw.read(len(b))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ArchiveError(self._archive, self._member, _why(e)) from e
        n = len(data)
        b[:n] = data
        return n


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def iter_members(
    path: str | Path,
    patterns: Sequence[str],
    *,
    part: int = 0,
    parts: int = 1,
    stats: WalkStats | None = None,
) -> Iterator[Member]:
    """Yield the selected members of part `part` of `parts`, one at a time, in archive order.

    `stats` (optional) is filled as the walk goes: member counts and (some of) the names of
    regular members the globs left out. Raises ArchiveError on a truncated or corrupt archive (after
    the members before the damage were handed out).
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in [0, {parts})")
    archive = str(path)
    stats = stats if stats is not None else WalkStats()
    match = member_matcher(patterns)
    last: str | None = None
    try:
        stream = _Recorder(_decompressed(archive))
    except OSError as e:
        raise ArchiveError(archive, None, f"cannot open ({_why(e)})") from e
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r:")  # type: ignore[call-overload]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ArchiveError(archive, None, f"not a readable tar archive ({_why(e)})") from e
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                raise ArchiveError(archive, last, f"after this member: {_why(e)}") from e
            # tarfile keeps every header it has read (TarFile.members); an archive of a
            # million members would hold them all: drop them, the walk never looks back
            tar.members.clear()
            if info is None:
                _check_end(stream.last, archive, last)
                return
            last = info.name
            if not info.isfile():
                continue
            stats.members += 1
            if not match(info.name):
                stats.skipped += 1
                if stats.keep_skipped is None or len(stats.skipped_names) < stats.keep_skipped:
                    stats.skipped_names.append(info.name)
                continue
            index = stats.selected
            stats.selected += 1
            if index % parts != part:
                continue
            yield Member(archive, info.name, info.size, index, tar, info)
    finally:
        stream.close()


class _Recorder:
    """The archive's (decompressed) byte stream for tarfile, remembering the last block read:
    after tarfile's walk ends, that block tells a proper end-of-archive marker (zeros) from a
    short or unreadable header, which tarfile also takes for the end."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.last = b""

    def read(self, n: int = -1) -> bytes:
        self.last = self._f.read(n)
        return self.last

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def _decompressed(path: str) -> IO[bytes]:
    """The archive's tar bytes: gzip, bzip2 and xz told by their magic bytes, decompressed
    on the fly (forward seeks decompress and discard)."""
    f = open(path, "rb")  # noqa: SIM115 - closed by the walk
    magic = f.read(6)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    if magic[:3] == b"BZh":
        return bz2.BZ2File(f)  # type: ignore[return-value]
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f)  # type: ignore[return-value]
    return f


def _check_end(block: bytes, archive: str, last: str | None) -> None:
    """The walk ended on `block`: it must be the end-of-archive marker (a zero block)."""
    if len(block) < _BLOCK:
        raise ArchiveError(archive, last, "the archive ends after this member without its "
                           "end-of-archive marker")  # fmt: skip
    if block.count(0) != _BLOCK:
        raise ArchiveError(archive, last, "unreadable tar header after this member")
