"""The documentation builds with `mkdocs build --strict` (broken links and bad references fail) and
the README's two commands are the ones CI runs.

What each test proves:
- docs_build_strict: `mkdocs build --strict` succeeds.
- readme_opens_with_the_two_commands: the README opens with the main command and the test command.
- ruff_clean: `ruff check` passes on the repository.
- demo_record_has_the_demo_defaults: the record atop docs/results.md ran with `DemoOptions`' defaults, so
  changing a default without recording the demo again fails.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_strict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_readme_opens_with_the_two_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    commands = [block.split("\n")[1] for block in text.split("```bash")[1:3]]
    assert commands == ["./setup.sh && .venv/bin/vlm-adapters demo", "./setup.sh && .venv/bin/python -m pytest -q"]
    assert text.index("```bash") < text.index("## ")  # before anything else


def test_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_demo_record_has_the_demo_defaults():
    from vlm_adapters.demo import DemoOptions

    with open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8") as fh:
        record = fh.read().split("<!-- demo-record:end -->")[0]
    options = next(line for line in record.splitlines() if line.startswith("- options: `"))
    assert ast.literal_eval(options.removeprefix("- options: `").rstrip("`")) == asdict(DemoOptions())
