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


def test_readme_command_lines_use_real_options():
    """Every flag in the README's command-line block is an option of that subcommand (docs that
    name a renamed or removed flag fail here, not in a user's terminal)."""
    from rankdown.cli import main

    block = re.search(r"## Command line\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    checked = 0
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if len(words) < 2 or words[0] != "rankdown":
            continue
        command = main.commands.get(words[1])
        assert command is not None, f"README names an unknown command: {line}"
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line.split("#")[0]):
            assert flag in known, f"README: {flag} is not an option of `rankdown {words[1]}`: {line}"
            checked += 1
    assert checked > 30
