"""Another commit's relay for `--baseline REF`: its sources in a temporary tree.

`git archive REF` of the bench's own checkout is unpacked into a temporary
directory, which the spawned relay gets first on its path (PYTHONPATH and its
working directory), so `python -m relay` there runs that commit's relay with
this venv's libraries. The tree's bench/ is reachable as `relay_bench` too,
in case that relay's CLI imports it. The directory is removed on exit.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from types import TracebackType

GIT_TIMEOUT_S = 60.0
HELP_TIMEOUT_S = 30.0


class BaselineError(Exception):
    """The baseline commit could not be found, unpacked or started."""


def _git(*args: str, cwd: str) -> bytes:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BaselineError(f"git {args[0]}: {exc}") from None
    if done.returncode != 0:
        raise BaselineError(f"git {' '.join(args)}: {done.stderr.decode().strip()}")
    return done.stdout


class RelayTree:
    """The sources of the relay at one commit, unpacked into a temporary directory."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.commit = ""
        self.path = ""
        self.flags: set[str] = set()  # the flags its `relay serve` knows

    def __enter__(self) -> RelayTree:
        here = os.path.dirname(os.path.abspath(__file__))
        checkout = _git("rev-parse", "--show-toplevel", cwd=here).decode().strip()
        commit = _git("rev-parse", "--verify", f"{self.ref}^{{commit}}", cwd=checkout)
        self.commit = commit.decode().strip()
        archive = _git("archive", "--format=tar", self.commit, cwd=checkout)
        self.path = tempfile.mkdtemp(prefix="relay-bench-baseline-")
        try:
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(self.path, filter="data")
            if os.path.isdir(os.path.join(self.path, "bench")):
                os.symlink("bench", os.path.join(self.path, "relay_bench"))
            self._check()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": self.path}

    def _check(self) -> None:
        """The tree's relay is the one Python imports there; learn its serve flags."""
        where = self._python("import relay; print(relay.__file__)").strip()
        if not where.startswith(self.path + os.sep):
            raise BaselineError(f"the baseline's Python imports relay from {where}, not the tree")
        usage = self._python(
            "import sys; sys.argv = ['relay', 'serve', '--help']; "
            "import runpy; runpy.run_module('relay', run_name='__main__')"
        )
        self.flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", usage))
        if "--port" not in self.flags:
            raise BaselineError(f"`relay serve --help` of {self.ref} lists no --port:\n{usage}")

    def _python(self, code: str) -> str:
        try:
            done = subprocess.run(
                [sys.executable, "-c", code],
                cwd=self.path,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=HELP_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BaselineError(f"cannot run the baseline's Python: {exc}") from None
        if done.returncode != 0:
            raise BaselineError(f"the relay of {self.ref} does not start:\n{done.stderr[-2000:]}")
        return done.stdout

    def known_args(self, args: list[str]) -> tuple[list[str], list[str]]:
        """`args` (flag, value pairs) without the flags this relay does not know; and those."""
        kept: list[str] = []
        dropped: list[str] = []
        for flag, value in zip(args[::2], args[1::2], strict=True):
            if flag in self.flags:
                kept += [flag, value]
            else:
                dropped.append(flag)
        return kept, dropped
