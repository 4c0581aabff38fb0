"""The one wrapper through which every external program (mmseqs, mkdssp, ...) is called.

It checks the program exists and its version, logs the exact command line, and raises
`ToolError` carrying the program's stderr when it fails.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger("esm3.tool")


class ToolError(RuntimeError):
    """An external program is missing, too old, or failed; the message says which and why."""


@dataclass(frozen=True)
class Tool:
    name: str  # executable name looked up on PATH
    version_args: tuple[str, ...] = ("--version",)
    version_pattern: str = r"(\d+(?:[.\-]\w+)*)"  # first match in stdout+stderr
    min_version: tuple[int, ...] = ()
    install_hint: str = ""

    def path(self) -> str:
        found = shutil.which(self.name)
        if not found:
            hint = f" ({self.install_hint})" if self.install_hint else ""
            raise ToolError(f"{self.name}: not found on PATH{hint}")
        return found

    def version(self) -> str:
        return _version(self)

    def run(
        self,
        args: list[str | Path],
        *,
        cwd: str | Path | None = None,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the program with `args`; return the completed process or raise ToolError."""
        exe = self.path()
        self.version()  # checks the minimum version once per process
        cmd = [exe, *map(str, args)]
        log.info("run: %s", shlex.join(cmd))
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, input=input
            )
        except subprocess.TimeoutExpired as e:
            raise ToolError(f"{self.name}: timed out after {timeout}s: {shlex.join(cmd)}") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-4000:]
            raise ToolError(
                f"{self.name} failed with exit code {proc.returncode}: {shlex.join(cmd)}\n{tail}"
            )
        return proc

    def feed(self, args: list[str | Path], chunks: Iterable[bytes | memoryview]) -> None:
        """Run the program with `args`, writing `chunks` to its stdin as they come: input
        larger than memory, never held whole. Raises ToolError as `run` does."""
        exe = self.path()
        self.version()
        cmd = [exe, *map(str, args)]
        log.info("run: %s < (stream)", shlex.join(cmd))
        # output to a file, not a pipe: a pipe nobody drains would block the program
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=out)
            try:
                _write_all(proc, chunks)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            if proc.wait() != 0:
                out.seek(0)
                tail = out.read().decode(errors="replace").strip()[-4000:]
                raise ToolError(
                    f"{self.name} failed with exit code {proc.returncode}: "
                    f"{shlex.join(cmd)}\n{tail}"
                )


def _write_all(proc: subprocess.Popen, chunks: Iterable[bytes | memoryview]) -> None:
    assert proc.stdin is not None
    try:
        for chunk in chunks:
            proc.stdin.write(chunk)
        proc.stdin.close()
    except BrokenPipeError:  # the program stopped reading: its exit code and output say why
        pass


def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


@cache
def _version(tool: Tool) -> str:
    exe = tool.path()
    proc = subprocess.run([exe, *tool.version_args], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    m = re.search(tool.version_pattern, out)
    if not m:
        raise ToolError(f"{tool.name}: cannot read its version from {out[:200]!r}")
    ver = m.group(1)
    if tool.min_version and _parse_version(ver) < tool.min_version:
        want = ".".join(map(str, tool.min_version))
        raise ToolError(f"{tool.name}: version {ver} is older than the required {want}")
    return ver


MMSEQS = Tool(
    "mmseqs",
    version_args=("version",),
    version_pattern=r"^([0-9a-f]+[.\-]\w+.*)$",
    min_version=(13,),
    install_hint="apt-get install mmseqs2, or use the suite's image",
)
MKDSSP = Tool(
    "mkdssp",
    version_args=("--version",),
    version_pattern=r"mkdssp version (\S+)",
    min_version=(4,),
    install_hint="apt-get install dssp, or use the suite's image",
)
