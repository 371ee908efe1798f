"""The repository documents itself: docs/objectives.md has every section the code cites and every registry
entry with the registry's own flags, and no tracked file points to a path outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = REPO / "docs" / "objectives.md"
CITATION = re.compile(r"docs/objectives\.md`*\s*§(\d+(?:\.\d+)?)")
PARENT_PATH = re.compile(r"(?:\.\./)+[\w.-]+")  # a relative path that climbs directories
DEV_MACHINE_PATH = re.compile(r"/work/\w+")  # an absolute path of the machine fdpo is developed on


def _outside(path: Path, line: str) -> bool:
    """True if `line` of `path` names a place outside the repository: a `../` path that resolves above
    the repository root (from the file's folder or from the root), or a development machine's path."""
    if DEV_MACHINE_PATH.search(line):
        return True
    for ref in PARENT_PATH.findall(line):
        if not any((base / ref).resolve().is_relative_to(REPO) for base in (path.parent, REPO)):
            return True
    return False


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in out.split():
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg"} and path.is_file():
            files.append(path)
    return files


def _sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", OBJECTIVES.read_text(), flags=re.MULTILINE))


def test_every_cited_section_exists():
    sections = _sections()
    assert {"0", "1.1", "1.2", "1.3", "3", "6", "7", "9"} <= sections
    missing = []
    for path in _tracked_text_files():
        for number in CITATION.findall(path.read_text(errors="replace")):
            if number not in sections:
                missing.append(f"{path.relative_to(REPO)}: §{number}")
    assert not missing, f"citations of sections docs/objectives.md does not have: {missing}"


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in _tracked_text_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _outside(path, line) and path != Path(__file__).resolve():
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:80]}")
    assert not offenders, offenders


def test_registry_table_matches_the_registry():
    from fdpo.divergences.registry import available_divergences, divergence_class

    rows = {}
    for line in OBJECTIVES.read_text().splitlines():
        match = re.match(r"\| `(\w+)`[^|]*\|([^|]*)\|", line)
        if match:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[match.group(1)] = (cells, {a.strip() for a in match.group(2).split(",")})
    for name in available_divergences():
        cls = divergence_class(name)
        assert name in rows, f"docs/objectives.md §0 has no row for registry entry {name!r}"
        cells, aliases = rows[name]
        assert aliases == set(cls.aliases), (name, aliases, cls.aliases)
        assert cells[-2].startswith("yes" if cls.f_dpo_valid else "no"), (name, "f-DPO valid", cells[-2])
        assert cells[-1].startswith("yes" if cls.mass_covering else "no"), (name, "mass covering", cells[-1])
