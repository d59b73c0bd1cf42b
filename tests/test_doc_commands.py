"""Every command in the docs is checked: its script exists and accepts every flag it is given.

Commands that need a GPU, a real cluster, cloud storage or the real data sets cannot run here;
like the rest, they are checked by a dry run against the command's own ``--help``: ``actr``,
``python pipelines/<x>.py``, ``python -m pipelines.<x>`` and ``python benchmarks/<x>.py`` alike. What the
commands do is exercised by the pipeline tests (make_shards, train, evaluate, match) and the
examples.
"""

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")


def doc_commands() -> list[tuple[str, str]]:
    """(doc name, command) for every shell line in a fenced block of the docs (continuations joined)."""
    found = []
    for doc in DOCS:
        inside, lang, pending = False, "", ""
        for line in doc.read_text().splitlines():
            fence = FENCE.match(line)
            if fence:
                inside, lang = (not inside), fence.group(1)
                continue
            if not inside or lang not in ("", "bash", "sh", "shell", "console"):
                continue
            text = pending + line.split(" #")[0].strip() if not line.lstrip().startswith("#") else pending
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            words = text.split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]  # environment assignments
            if words and (
                words[:3] == ["python", "-m", "pipelines.quickstart"]
                or (len(words) > 1 and words[1].startswith(("pipelines/", "benchmarks/")))
                or words[0] in ("actr", "bash")
                or (len(words) > 1 and words[1].startswith("examples/"))
                or words[:3] == ["ray", "job", "submit"]
                or words[:2] == ["ray", "start"]
            ):
                found.append((doc.name, " ".join(words)))
    return found


COMMANDS = doc_commands()


@cache
def help_text(*prefix: str) -> str:
    done = subprocess.run([*prefix, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(prefix)} --help failed: {done.stderr[-2000:]}"
    return (done.stdout + done.stderr).replace("_", "-")


def listed(flag: str, text: str) -> bool:
    """``--flag`` appears in a help text (as ``--flag`` or, in a list of settings, as ``flag``)."""
    bare = re.escape(flag.lstrip("-"))
    return re.search(rf"(?:--|(?<![\w-])){bare}(?![\w-])", text) is not None


def flags(words: list[str]) -> list[str]:
    return [w.split("=")[0].replace("_", "-") for w in words if w.startswith("--") and len(w) > 2 and w != "--help"]


def test_docs_have_commands():
    assert len(COMMANDS) >= 15


def test_benchmark_and_module_commands_are_collected(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```bash\npython benchmarks/known_warps.py --seeds 3  # a comment\npython -m pipelines.quickstart --epochs 1\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [doc])
    assert doc_commands() == [
        ("x.md", "python benchmarks/known_warps.py --seeds 3"),
        ("x.md", "python -m pipelines.quickstart --epochs 1"),
    ]


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_doc_command_dry_run(doc, command):
    words = shlex.split(command)
    if words[0] == "bash":
        script = ROOT / words[1]
        assert script.is_file(), f"{doc}: {words[1]} does not exist"
        subprocess.run(["bash", "-n", str(script)], check=True)
        return
    if words[0] == "python" and words[1].startswith("examples/"):
        assert (ROOT / words[1]).is_file(), f"{doc}: {words[1]} does not exist"
        return
    if words[:2] == ["python", "-m"]:
        module = words[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{doc}: {module} does not exist"
        prefix, rest = (sys.executable, "-m", module), words[3:]
    elif words[0] == "python":
        assert (ROOT / words[1]).is_file(), f"{doc}: {words[1]} does not exist"
        prefix, rest = (sys.executable, words[1]), words[2:]
    elif words[0] == "actr":
        prefix, rest = (sys.executable, "-m", "pipelines.cli", words[1]), words[2:]
    elif words[:3] == ["ray", "job", "submit"]:
        sep = words.index("--")
        assert words[sep + 1] == "python" and (ROOT / words[sep + 2]).is_file()
        for flag in flags(words[3:sep]):
            assert listed(flag, help_text(str(Path(sys.executable).parent / "ray"), "job", "submit")), flag
        prefix, rest = (sys.executable, words[sep + 2]), words[sep + 3 :]
    else:  # ray start
        prefix, rest = (str(Path(sys.executable).parent / "ray"), "start"), words[2:]
    text = help_text(*prefix)
    for flag in flags(rest):
        assert listed(flag, text), f"{doc}: `{command}` uses {flag}, which `{' '.join(prefix[1:])} --help` does not list"
