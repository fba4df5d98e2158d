"""The README's Python example runs as written, and its two commands are the ones CI uses."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    text = README.read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "runs/api-example/plan.json").is_file()


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first) == 2
    ci = (README.parent / ".ci/run").read_text()
    assert first[1] in ci
