"""A throwaway PostgreSQL cluster on loopback, for tests and benchmarks.

    with throwaway_cluster() as server:       # initdb in a temporary directory, pg_ctl start
        url = server.new_database("labels")   # postgresql+psycopg://postgres@127.0.0.1:PORT/labels
    # stopped and deleted on exit

It uses Debian's PostgreSQL server binaries (`apt-get install postgresql`; `.ci/run`
installs them). initdb refuses to run as root, so as root the cluster runs as the
`postgres` user the package creates. Trust authentication, on 127.0.0.1 only.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL's server is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


class Cluster:
    def __init__(self, port: int, run):
        self.port, self._run = port, run
        self.base = f"postgresql+psycopg://postgres@127.0.0.1:{port}"

    def new_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.base}/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def throwaway_cluster(max_connections: int = 200):
    bins = server_binaries()
    if bins is None:
        raise RuntimeError("PostgreSQL's server is not installed (apt-get install postgresql)")
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    tmp = Path(tempfile.mkdtemp(prefix="heed-pg-"))
    data = tmp / "data"
    if as_root:
        shutil.chown(tmp, "postgres")
        os.chmod(tmp, 0o700)

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True)

    port = _free_port()
    try:
        run(str(bins / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-sync", "--locale=C")
        options = (f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} "
                   "-c fsync=on -c shared_buffers=64MB")
        run(str(bins / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(tmp / "log"), "-w", "start")
        try:
            yield Cluster(port, run)
        finally:
            subprocess.run([*prefix, str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True)
    except subprocess.CalledProcessError as e:
        log = (tmp / "log").read_text() if (tmp / "log").exists() else ""
        raise RuntimeError(f"{' '.join(e.cmd)} failed: {e.stderr}{log[-2000:]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
