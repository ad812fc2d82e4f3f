"""The docs say only what is true: every ```python block in README.md and docs/*.md runs, and the settings
table in docs/configuration.md lists exactly the options of `conf.DEFAULTS`, with their defaults.

Each block runs on its own, with `cache` bound to a fresh backend on the test cluster (a key prefix of its
own) and `settings` bound to Django's settings; `django.core.cache.cache` points at the same prefix while
the block runs, so a sample may import it. A block with a top-level `await` runs in an event loop. A block
that defines `CACHES` must describe backends that can be created (LOCATION and OPTIONS are validated).
`failure_counts` is shared by every backend in the process with the same connection settings, so a sample
asserts on the difference between two readings, never on an absolute count. A block that imports the test
suite's models (`tests.model_app`) runs with the test database as a transactional test does: transactions
really commit (so write-through runs on commit, as in production), and the tables are emptied afterwards.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import linecache
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache.backends.base import default_key_func
from django.test import override_settings

from django_distcache.cache import RedisClusterCache
from django_distcache.conf import DEFAULTS
from tests.conftest import make_cache

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BACKEND = "django_distcache.cache.RedisClusterCache"

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # line number of the first line of code
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with the indentation of list items removed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        fence, start = match["fence"], index + 1
        end = start
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        assert end < len(lines), f"{path.name}:{index + 1}: code block is never closed"
        code = textwrap.dedent("\n".join(lines[start:end]))
        blocks.append(Block(path, start + 1, match["info"].lower(), code))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in fenced_blocks(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language == "python"]


def _sample_param(block: Block) -> object:
    """A block that uses the test suite's models gets a database whose transactions commit for real."""
    marks = [pytest.mark.django_db(transaction=True)] if "tests.model_app" in block.code else []
    return pytest.param(block, id=block.name, marks=marks)


def test_the_docs_have_python_samples():
    assert len(PYTHON_BLOCKS) >= 20
    assert {block.path.name for block in PYTHON_BLOCKS} >= {
        "README.md",
        "api.md",
        "configuration.md",
        "tags.md",
        "versioned-keys.md",
        "models.md",
        "write-behind.md",
    }


def test_every_block_names_its_language_and_python_is_spelled_python():
    """So that no Python sample escapes this test under another name (py, pycon, an empty info string)."""
    unnamed = [block.name for block in ALL_BLOCKS if not block.language]
    assert unnamed == [], "give these code blocks a language (python, sh, text, ...)"
    misspelled = [block.name for block in ALL_BLOCKS if block.language in {"py", "python3", "pycon", "py3"}]
    assert misspelled == [], "write ```python so that the block is run by this test"


@pytest.mark.parametrize("block", [_sample_param(block) for block in PYTHON_BLOCKS])
def test_python_sample_runs(block: Block):
    cache = make_cache()
    namespace = {"__name__": "docs_sample", "cache": cache, "settings": settings}
    # Pad with blank lines so that a traceback points at the line in the Markdown file, and show the
    # sample (not the prose around it) in the traceback.
    source = "\n" * (block.line - 1) + block.code + "\n"
    filename = f"{block.path}:{block.line}"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    code = compile(source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    default_cache = {
        "BACKEND": BACKEND,
        "LOCATION": settings.CLUSTER_LOCATION,
        "KEY_PREFIX": cache.key_prefix,
        "TIMEOUT": 300,
    }
    with override_settings(CACHES={"default": default_cache}):
        if code.co_flags & inspect.CO_COROUTINE:
            asyncio.run(eval(code, namespace))
        else:
            exec(code, namespace)
    # A settings sample must describe caches that can be created: creating one validates LOCATION and
    # OPTIONS (ImproperlyConfigured otherwise) and sends no command; only the invalidation channel's
    # subscriber thread, started once per cluster, tries to connect in the background.
    for params in namespace.get("CACHES", {}).values():
        if params.get("BACKEND") == BACKEND:
            RedisClusterCache(params["LOCATION"], params)


_ABSOLUTE_COUNT = re.compile(r"failure_counts(\[[^\]]*\])?\s*==\s*[\d{]")


def test_no_sample_asserts_an_absolute_failure_count():
    """Counts are shared with every other backend on the same cluster, so only a difference is exact."""
    absolute = [block.name for block in PYTHON_BLOCKS if _ABSOLUTE_COUNT.search(block.code)]
    assert absolute == [], "compare failure_counts with a reading taken before, not with a constant"


_OPTION_ROW = re.compile(
    r"^\| `(?P<name>[A-Z_]+)` \| (?P<where>top level|`OPTIONS`) \| `(?P<default>[^`]*)` \|"
)


def _settings_table() -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {"top level": {}, "`OPTIONS`": {}}
    for line in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines():
        match = _OPTION_ROW.match(line)
        if match:
            assert match["name"] not in rows[match["where"]], f"{match['name']} is listed twice"
            rows[match["where"]][match["name"]] = match["default"]
    return rows


def test_the_settings_table_lists_every_option_with_its_default():
    options = _settings_table()["`OPTIONS`"]
    assert sorted(options) == sorted(DEFAULTS)
    for name, default in options.items():
        documented = ast.literal_eval(default)
        assert documented == DEFAULTS[name] and type(documented) is type(DEFAULTS[name]), name


def test_the_settings_table_gives_djangos_own_defaults():
    top_level = {name: ast.literal_eval(default) for name, default in _settings_table()["top level"].items()}
    assert sorted(top_level) == ["KEY_FUNCTION", "KEY_PREFIX", "TIMEOUT", "VERSION"]
    backend = RedisClusterCache(settings.CLUSTER_LOCATION, {})
    assert backend.key_prefix == top_level["KEY_PREFIX"]
    assert backend.version == top_level["VERSION"]
    assert backend.default_timeout == top_level["TIMEOUT"]
    assert top_level["KEY_FUNCTION"] is None and backend.key_func is default_key_func


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    assert [page for page in pages if f" {page}" not in nav] == []
