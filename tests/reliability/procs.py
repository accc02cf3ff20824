"""Real processes for the reliability tests: a trainer driven on stdin (`trainer.py`) and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the repository importable (and `extra` on top)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO), **(extra or {})}


class TrainerProcess:
    """`python -m tests.reliability.trainer SPEC`: send commands, read their JSON answers.

    Every stdout line is kept (with the time it was read) by a reader thread, so a process
    that is killed mid-command still shows what it printed before; stderr goes to a file.
    """

    def __init__(self, spec: dict[str, Any], stderr: Path, env: dict[str, str] | None = None) -> None:
        self.stderr_path = stderr
        self._stderr = open(stderr, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen([sys.executable, "-m", "tests.reliability.trainer", json.dumps(spec)],
                                        cwd=REPO, env=child_env(env), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.lines: list[dict[str, Any]] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new:
                self.lines.append(json.loads(line))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def send(self, command: str, wait: bool = True, timeout: float = 300.0) -> dict[str, Any]:
        """Send one command; with `wait`, return its answer (fails if the process ends first)."""
        assert self.process.stdin is not None
        seen = len(self.lines)
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        if not wait:
            return {}
        name = command.split()[0]
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                answer = next((a for a in self.lines[seen:] if a.get("ok") == name), None)
                if answer is not None:
                    return answer
                if not self._reader.is_alive() or time.monotonic() > deadline:
                    raise AssertionError(f"trainer gave no answer to {command!r} (exit {self.process.poll()}): "
                                         f"{self.stderr()}")
                self._new.wait(1.0)

    def wait_lines(self, n: int, timeout: float = 300.0) -> None:
        """Until at least `n` lines were printed."""
        deadline = time.monotonic() + timeout
        with self._new:
            while len(self.lines) < n:
                assert self._reader.is_alive() and time.monotonic() < deadline, self.stderr()
                self._new.wait(1.0)

    def wait(self, timeout: float = 120.0) -> int:
        """Close stdin and wait for the exit code."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        self._stderr.close()
        return code

    def kill(self) -> float:
        """SIGKILL now; returns the wall time of the kill."""
        at = time.time()
        self.process.kill()
        return at

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m gradwatch.cli ARGS` as a subprocess."""
    return subprocess.run([sys.executable, "-m", "gradwatch.cli", *args], cwd=REPO, env=child_env(env),
                          capture_output=True, text=True, check=False, timeout=300)
