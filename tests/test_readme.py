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
    from rankdown.app.cli import main

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


def _section(title: str) -> str:
    return README.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
def test_readme_own_model_walkthrough_runs_as_written(tmp_path, capsys, monkeypatch):
    """The README's walk-through, as a user would follow it: their model file, their weights,
    their image folders, and the three commands exactly as printed."""
    import shlex
    import sys

    import torch
    from safetensors.torch import save_file

    from test_reliability import in_process
    from test_userdata import write_images

    section = _section("Your own model and your own data")
    (tmp_path / "mynet.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynet", None)
    import mynet

    torch.manual_seed(0)
    save_file(mynet.make().state_dict(), str(tmp_path / "mynet.safetensors"))
    write_images(tmp_path / "images" / "train", classes=3, per_class=16, size=36)
    write_images(tmp_path / "images" / "val", classes=3, per_class=6, size=36, seed=1)
    commands = [line for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()]
    commands = [c for c in commands if c.startswith("rankdown ")]
    assert len(commands) == 3
    for line in commands:
        args = [*shlex.split(line)[1:], "-q", "--latency-runs" if line.split()[1] != "bench" else "--runs", "2"]
        code, _, err = in_process(args, capsys, tmp_path)
        assert code == 0, (line, err)
    report = __import__("json").loads((tmp_path / "runs/mynet/report.json").read_text())
    assert report["quality"]["examples"] == 18 and report["totals"]["macs_reduction"] >= 1.9


@pytest.mark.slow
def test_readme_workload_example_runs(tmp_path, monkeypatch, has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    blocks = re.findall(r"```python\n(.*?)```", _section("Python API"), re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), scope)
    assert scope["report"].quality["examples"] == 256
