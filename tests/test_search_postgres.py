"""Two search workers on one study in a real PostgreSQL: a throwaway cluster (Debian's `postgresql`
package, which `.ci/run` installs) started on a free loopback port and removed after the test."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.test_search import SPACE, check_two_workers, search_tree  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]), None)
    return Path(found).resolve().parent if found else None  # Debian: /usr/lib/postgresql/N/bin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    bin_dir = postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs it (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="kdforge-pg-"))  # under /tmp: the postgres user must reach it
    data, port = root / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: the package's `postgres` user runs the cluster
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kdforge")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "kdforge", "search")
        yield f"postgresql://kdforge@127.0.0.1:{port}/search"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(search_tree, postgres_url, tmp_path):  # noqa: F811
    search_tree["search"].update(method="random", trials=6, final_top=0, storage=postgres_url, study_name="pg")
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(search_tree))
    check_two_workers(search_tree, config, {"study_name": "pg", "storage": postgres_url})
