"""Starts the real server: the binary cargo built, on a free port, in a temp dir.

The binary is ``$ERN_REGISTRY_BIN``, else ``debug/ern-registry`` under
``$CARGO_TARGET_DIR`` or the repository's ``target/`` (build it with ``cargo build``).
Readiness: the server logs ``ern-registry ready`` with its ``local_addr`` (JSON logs),
which these fixtures wait for before a test runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import time
from dataclasses import dataclass, field

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
DEMO_PATIENTS = 1500


def binary() -> pathlib.Path:
    explicit = os.environ.get("ERN_REGISTRY_BIN")
    if explicit:
        return pathlib.Path(explicit)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / "ern-registry"


def clean_env() -> dict[str, str]:
    """The environment without the server's settings (a developer's shell may set them)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ERN_") and k != "DATABASE_URL"
    }


@dataclass
class Server:
    data_dir: pathlib.Path
    address: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log: pathlib.Path | None = None

    def cli(self, *args: str) -> str:
        """Runs ``ern-registry --data-dir DIR ARGS`` and returns its stdout."""
        done = subprocess.run(
            [str(binary()), "--data-dir", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ern-registry {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def principal(self, name: str, role: str, *more: str) -> str:
        out = self.cli("admin", "create-principal", "--name", name, "--role", role, *more)
        match = re.search(r"api key \(shown once, store it now\): (\S+)", out)
        assert match, out
        self.keys[name] = match.group(1)
        return match.group(1)

    def start(self, *serve_args: str) -> None:
        self.log = self.data_dir / "server.log"
        log = open(self.log, "wb")
        self.process = subprocess.Popen(
            [
                str(binary()),
                "--data-dir",
                str(self.data_dir),
                "--log-format",
                "json",
                "serve",
                "--listen",
                "127.0.0.1:0",
                *serve_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=clean_env(),
        )
        log.close()
        # Wait for the ready line (a readiness poll, not a timing assertion).
        for _ in range(1200):
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()}")
            for line in self.log.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("message") == "ern-registry ready":
                    self.address = event["local_addr"]
                    return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def ern_binary() -> pathlib.Path:
    path = binary()
    if not path.exists():
        pytest.fail(f"{path} not found: run `cargo build` first (or set ERN_REGISTRY_BIN)")
    return path


@pytest.fixture(scope="session")
def demo_server(ern_binary, tmp_path_factory) -> Server:
    """A server with DEMO_PATIENTS synthetic patients in ERN-LUNG, a physician of NL-UMCU
    (``dr-jansen``) and a researcher of ERN-LUNG (``dr-visser``)."""
    server = Server(tmp_path_factory.mktemp("demo"))
    server.cli("demo", "--patients", str(DEMO_PATIENTS), "--registry", "ERN-LUNG")
    server.cli(
        "admin", "create-centre", "--code", "NL-UMCU", "--name", "UMC Utrecht",
        "--country", "NL", "--ern", "ERN-EYE", "--ern", "ERN-LUNG",
    )
    server.principal("dr-jansen", "physician", "--centre", "NL-UMCU")
    server.principal("dr-visser", "researcher", "--ern", "ERN-LUNG")
    server.start("--research-queries-per-minute", "10000")
    yield server
    server.stop()
