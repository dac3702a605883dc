"""Every shell and Python example of README.md and the docs runs here, so an example that
drifts from the commands or the API fails the suite.

An example is a fenced block tagged `sh` or `python`. A page's examples run in order in one
sandbox (a fresh home folder and working folder, the tiny Llama model as `$EDGEFED_BASE`,
and the folders of text the examples name: ~/notes, ~/Documents/reports, ~/my-clients,
my-notes/), so a later example can use what an earlier one made, as a reader would. In a shell
example a comment line `# laptop ...` starts another machine: its own home folder and
`$EDGEFED_HOME`, with ~/Sync the folder every laptop shares. An example that cannot run here
(an install, a benchmark of hours, a cloud bucket) says why in the comment line just above its
fence: `<!-- example: not run: REASON -->`; any other is run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import write_repetitive_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!-- example: not run: (.+) -->$")
_LAPTOP = re.compile(r"^# laptops? ")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the reason given, for an example the suite does not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_examples(page: Path) -> list[Example]:
    """The `sh` and `python` blocks of a page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    examples, start, language = [], None, ""
    for number, line in enumerate(lines, 1):
        fence = _FENCE.match(line)
        if fence is None:
            continue
        if start is None:
            start, language = number, fence.group(1)
            continue
        if language in ("sh", "python"):
            above = lines[start - 2].strip() if start >= 2 else ""
            reason = _NOT_RUN.match(above)
            code = "\n".join(lines[start:number - 1]) + "\n"  # fmt: skip
            examples.append(Example(page, start, language, code, reason and reason.group(1)))
        start = None
    return examples


EXAMPLES = [example for page in PAGES for example in page_examples(page)]
RUN_PAGES = sorted({e.page for e in EXAMPLES if e.not_run is None})


def test_the_collector_finds_the_examples_and_every_one_left_out_says_why():
    assert len(EXAMPLES) >= 20 and len(RUN_PAGES) >= 5
    assert {e.language for e in EXAMPLES} == {"sh", "python"}
    for example in EXAMPLES:
        assert example.code.strip(), f"{example.where}: an empty example"
        if example.not_run is not None:
            assert len(example.not_run) > 15, f"{example.where}: say why it is not run"


class Sandbox:
    """A reader's machines: a working folder, the text the examples name, one home per
    laptop, and ~/Sync shared between them."""

    def __init__(self, root: Path, base: Path) -> None:
        self.root, self.base = root, base
        self.work = root / "work"
        self.shared = root / "shared-folder"
        self.shared.mkdir(parents=True)
        venv = ROOT / ".venv"
        self.work.mkdir()
        (self.work / ".venv").symlink_to(venv if venv.is_dir() else Path(sys.prefix))
        write_repetitive_corpus(self.work / "my-notes", 12)
        self.laptops = 0
        self.new_laptop()

    def new_laptop(self) -> Path:
        self.laptops += 1
        home = self.root / f"laptop-{self.laptops}"
        (home / "Sync").parent.mkdir(parents=True)
        (home / "Sync").symlink_to(self.shared)
        write_repetitive_corpus(home / "notes", 12, start=100 * self.laptops)
        write_repetitive_corpus(home / "Documents" / "reports", 12, start=100 * self.laptops + 50)
        for client in ("north", "south"):
            write_repetitive_corpus(home / "my-clients" / client, 12, start=len(client))
        self.home, self.fresh = home, True
        return home

    def environment(self) -> dict[str, str]:
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("EDGEFED_") and key not in ("HOME", "PWD")
        }
        bin_dir = str(Path(sys.executable).parent)
        return environment | {
            "HOME": str(self.home),
            "EDGEFED_HOME": str(self.home / ".edgefed"),
            "EDGEFED_BASE": str(self.base),
            "PATH": f"{bin_dir}{os.pathsep}{environment.get('PATH', '')}",
            "COLUMNS": "120",
        }

    def run(self, example: Example) -> None:
        if example.language == "python":
            self._check(example, [sys.executable, "-c", example.code])
            return
        segment: list[str] = []
        for line in example.code.splitlines():
            if _LAPTOP.match(line.strip()):
                self._shell(example, segment)
                segment = []
                if not self.fresh:
                    self.new_laptop()
            segment.append(line)
        self._shell(example, segment)

    def _shell(self, example: Example, lines: list[str]) -> None:
        if any(line.strip() and not line.strip().startswith("#") for line in lines):
            self._check(example, ["bash", "-c", "set -euo pipefail\n" + "\n".join(lines)])

    def _check(self, example: Example, command: list[str]) -> None:
        self.fresh = False
        done = subprocess.run(
            command,
            cwd=self.work,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert done.returncode == 0, (
            f"{example.where} failed (exit {done.returncode}):\n{example.code}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )


@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_the_examples_of_a_page_run_as_written(page, tmp_path, tiny_llama_gguf):
    sandbox = Sandbox(tmp_path, tiny_llama_gguf)
    python: list[Example] = []  # consecutive Python examples run as one script, as a reader
    for example in page_examples(page):  # runs them in one session
        if example.not_run is not None:
            continue
        if example.language == "python":
            python.append(example)
            continue
        if python:
            sandbox.run(_joined(python))
            python = []
        sandbox.run(example)
    if python:
        sandbox.run(_joined(python))


def _joined(examples: list[Example]) -> Example:
    first = examples[0]
    code = "".join(e.code for e in examples)
    return Example(first.page, first.line, "python", code, None)
