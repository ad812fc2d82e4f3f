"""What `make dist-check` asserts about the built distributions, in two steps.

    python .ci/dist_check.py contents DIST_DIR   # the sdist and wheel hold what they should, and no more
    python .ci/dist_check.py example             # run by the wheel's own venv, from example_project/

`example` proves that the installed wheel, not this checkout, serves the example shop: its migrations
apply, its management commands run, a page is cached and a write-behind view count reaches the database.
Standard library only, so that the fresh venv needs nothing but the wheel and its dependencies.
"""

from __future__ import annotations

import email.parser
import io
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "django_distcache"

# Top-level files an sdist may hold besides the package, its egg-info and docs/.
SDIST_TOP_LEVEL = {"PKG-INFO", "pyproject.toml", "setup.cfg", "MANIFEST.in", "LICENSE", "README.md",
                   "CHANGELOG.md", "mkdocs.yml"}  # fmt: skip
SDIST_REQUIRED = {"PKG-INFO", "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md", "docs/index.md"}
# Whatever a working tree gathers that must never be shipped: caches, venvs, clusters, results, databases.
JUNK_PARTS = {".devcluster", ".venv", ".venv-newest-django", ".cache", ".git", "__pycache__", ".pytest_cache",
              ".hypothesis", ".ruff_cache", ".mypy_cache", "site", "build", "dist"}  # fmt: skip
JUNK_SUFFIXES = {".pyc", ".pyo", ".sqlite3", ".log", ".lock", ".pid", ".rdb", ".aof"}


def fail(problems: list[str]) -> None:
    print("dist-check: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)


def package_files() -> set[str]:
    """Every file of the package in this checkout, as a path inside a distribution."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def junk(names: set[str]) -> list[str]:
    return sorted(
        name for name in names if JUNK_PARTS & set(name.split("/")) or Path(name).suffix in JUNK_SUFFIXES
    )


def sdist_problems(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as archive:
        members = [member.name.split("/", 1)[1] for member in archive.getmembers() if member.isfile()]
    names = set(members)
    problems = [
        f"sdist lacks {name}" for name in sorted(SDIST_REQUIRED | package_files()) if name not in names
    ]
    problems += [f"sdist ships junk: {name}" for name in junk(names)]
    stray = [
        name
        for name in names
        if "/" not in name
        and name not in SDIST_TOP_LEVEL
        or "/" in name
        and name.split("/", 1)[0] not in {PACKAGE, f"{PACKAGE}.egg-info", "docs"}
    ]
    problems += [f"sdist ships a file of no use to it: {name}" for name in sorted(stray)]
    return problems


def wheel_problems(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(name.split("/", 1)[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
    problems = [f"wheel lacks {name}" for name in sorted(package_files()) if name not in names]
    if f"{dist_info}/licenses/LICENSE" not in names:
        problems.append("wheel lacks the LICENSE file")
    problems += [f"wheel ships junk: {name}" for name in junk(names)]
    stray = [name for name in names if name.split("/", 1)[0] not in {PACKAGE, dist_info}]
    problems += [f"wheel ships a file outside the package: {name}" for name in sorted(stray)]
    version = tuple(int(part) for part in metadata["Metadata-Version"].split("."))
    if version < (2, 4):
        problems.append(f"wheel metadata {metadata['Metadata-Version']}: License-Expression needs 2.4")
    if metadata["License-Expression"] != "BSD-3-Clause" or metadata.get_all("License-File") != ["LICENSE"]:
        problems.append(
            f"wheel metadata: License-Expression {metadata['License-Expression']!r}, "
            f"License-File {metadata.get_all('License-File')!r}"
        )
    if metadata["License"] is not None:
        problems.append("wheel metadata still has the deprecated License field")
    return problems


def check_contents(dist_dir: Path) -> None:
    sdists, wheels = sorted(dist_dir.glob("*.tar.gz")), sorted(dist_dir.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        fail([f"expected one sdist and one wheel in {dist_dir}, found {[p.name for p in sdists + wheels]}"])
    problems = sdist_problems(sdists[0]) + wheel_problems(wheels[0])
    if problems:
        fail(problems)
    with tarfile.open(sdists[0]) as archive:
        count = sum(1 for member in archive.getmembers() if member.isfile())
    print(f"dist-check: {sdists[0].name} ({count} files) and {wheels[0].name} hold what they should")


# Runs in the shop's Django, after the management commands: pages through the test client, then the drain.
def visit_the_shop() -> list[str]:
    from catalogue.models import Product, ProductViews
    from django.core.management import call_command
    from django.test import Client
    from django.test.utils import setup_test_environment

    setup_test_environment()  # lets the test client's host through ALLOWED_HOSTS
    client = Client()
    product = Product.objects.order_by("pk").first()
    assert product is not None, "seed_catalogue made no product"
    problems = []
    for url in ("/", product.get_absolute_url()):
        first, second = client.get(url), client.get(url)
        if first.status_code != 200 or second.status_code != 200:
            problems.append(f"GET {url}: {first.status_code}, then {second.status_code}")
        elif b'class="badge hit"' not in second.content:
            problems.append(f"GET {url} a second time was not served from the cache")
    call_command("flushbehind", stdout=io.StringIO())  # drains the view counts (write-behind) to the database
    views = ProductViews.objects.filter(pk=product.pk).values_list("views", flat=True).first()
    if views != 2:
        problems.append(f"the product's view count in the database is {views}, expected 2")
    return problems


def check_example() -> None:
    import importlib.metadata
    import importlib.resources
    import os
    import sysconfig

    import django_distcache

    installed = Path(django_distcache.__file__).resolve().parent
    problems = []
    if installed.parent != Path(sysconfig.get_paths()["purelib"]).resolve():
        problems.append(f"django_distcache is imported from {installed}, not from this venv's site-packages")
    if not importlib.resources.files(PACKAGE).joinpath("py.typed").is_file():
        problems.append("the installed package has no py.typed")
    if importlib.metadata.metadata("django-distcache")["License-Expression"] != "BSD-3-Clause":
        problems.append("the installed metadata has no License-Expression BSD-3-Clause")
    if problems:
        fail(problems)

    sys.path.insert(0, os.getcwd())  # example_project/, as manage.py would have it
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("check")  # the package's system checks, against the cluster; raises on an error
    output = io.StringIO()
    call_command("migrate", interactive=False, stdout=output)
    if "Applying django_distcache.0001_initial... OK" not in output.getvalue():
        fail([f"migrate did not apply the package's migration:\n{output.getvalue()}"])
    call_command("seed_catalogue", products=20, verbosity=0)
    call_command("warmcache", all=True, dry_run=True, stdout=io.StringIO())
    call_command("warmcache", all=True, stdout=io.StringIO())
    problems = visit_the_shop()
    if problems:
        fail(problems)
    print(f"dist-check: the example shop ran on the installed wheel ({installed})")


def main(argv: list[str]) -> None:
    if argv[:1] == ["contents"] and len(argv) == 2:
        check_contents(Path(argv[1]))
    elif argv == ["example"]:
        check_example()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
