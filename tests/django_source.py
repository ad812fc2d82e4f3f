"""Django's own cache tests, taken from the source distribution of the installed Django at test time.

The conformance suite (`test_conformance.py`) imports `BaseCacheTests` from it; nothing of it is copied
into this repository. The sdist is fetched once with pip and kept under `.cache/django-src/<version>/`.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".cache" / "django-src"


def django_tests_dir() -> Path:
    """The `tests/` directory of the installed Django's sdist, downloading it if needed."""
    version = django.__version__
    target = CACHE_DIR / version
    tests_dir = target / "tests"
    if (tests_dir / "cache" / "tests.py").exists():
        return tests_dir
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                download,
                f"django=={version}",
            ],
            capture_output=True,
            text=True,
        )
        archives = list(Path(download).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download the Django {version} source distribution for the conformance suite:\n"
                f"{result.stderr}"
            )
        with tarfile.open(archives[0]) as archive:
            prefix = archive.getnames()[0].split("/")[0]
            wanted = [m for m in archive.getmembers() if m.name.startswith(f"{prefix}/tests/cache/")]
            archive.extractall(target, members=wanted, filter="data")
        (target / prefix / "tests").rename(tests_dir)
        (target / prefix).rmdir()
    return tests_dir


def add_django_tests_to_path() -> Path:
    tests_dir = django_tests_dir()
    if str(tests_dir) not in sys.path:
        sys.path.insert(0, str(tests_dir))
    return tests_dir
