"""The shell blocks of the README and of docs/ marked ``<!-- runnable -->`` run as written, from a fresh copy of the
repository, and write nothing but under ``runs/`` (never over a tracked file)."""
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, scaled_timeout

MARKER = "<!-- runnable -->"
# what a block may take on the project's 2-core machine (seconds), for the scaled timeout
COST = 120


def runnable_blocks():
    """``(line number, commands)`` of every ```bash block right after the marker, in the README and in the
    manual under docs/."""
    blocks = []
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        name = document.relative_to(ROOT).as_posix()
        lines = document.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.strip() == MARKER:
                assert lines[index + 1].strip() == "```bash", f"{name}:{index + 1}: {MARKER} must precede a ```bash block"
                end = lines.index("```", index + 2)
                commands = [c for c in lines[index + 2:end] if c.strip() and not c.lstrip().startswith("#")]
                blocks.append(pytest.param(commands, id=f"{name}:{index + 3}"))
    return blocks


def tracked_files():
    """The files of a clone (tracked or new and not ignored); None outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return None
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_the_readme_marks_its_cheap_examples_runnable():
    assert len(runnable_blocks()) >= 3


@pytest.mark.parametrize("commands", runnable_blocks())
@pytest.mark.slow
def test_readme_block_runs_as_written(commands, tmp_path):
    files = tracked_files()
    if files is None:
        pytest.skip("not a git checkout: the README's commands are run from a clone")
    clone = tmp_path / "clone"
    for name in files:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, clone / name)
    before = digests(clone)
    shims = tmp_path / "bin"  # `python` in the README is this interpreter, with its environment's packages
    shims.mkdir()
    (shims / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shims / "python").chmod(0o755)
    environment = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=clone, env=environment, capture_output=True, text=True,
                                timeout=scaled_timeout(COST))
        assert result.returncode == 0, f"$ {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"$ {command}\n{result.stderr[-3000:]}"
    after = digests(clone)
    changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
    assert not changed, f"README commands changed tracked files: {changed}"
    outside = sorted(name for name in set(after) - set(before) if not re.match(r"runs/", name))
    assert not outside, f"README commands wrote outside runs/: {outside}"


def test_the_readme_is_a_front_door_and_its_links_resolve():
    """At most 400 lines (set-up, the command line, plugging in a dataset, the rest in brief); every relative
    link of the README and of docs/ names a file that exists and, with an anchor, a heading in it."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            assert linked.is_file(), f"{document.name}: link to {target}, no such file"
            if anchor and linked.suffix == ".md":
                slugs = {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                         for line in linked.read_text().splitlines() if line.startswith("#")}
                assert anchor in slugs, f"{document.name}: link to {target}, no such heading"
