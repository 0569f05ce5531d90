"""The documentation works as written: every fenced code block of README.md, CHANGELOG.md and docs/*.md runs, or
says why not, and every relative link points to a file (and heading) that exists.

A block that cannot run here (official weights, a GPU, a dataset, hours) is preceded by one HTML comment line, which
GitHub does not render:

    <!-- not run: needs the official checkpoint files -->
    ```python

Other ```python blocks run as scripts (one after the other in one interpreter, each in its own folder and a fresh
namespace: the imports of torch and diffusers take seconds) and ```bash blocks line by line (comment lines skipped,
`\\` continuations joined), each block in a fresh temporary folder with the hub offline, one torch thread per process
and this environment's `vartk` / `python` first on PATH. ```text blocks (file trees, output) are not run. The blocks
run in parallel on the machine's cores, all started when the first of them is needed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:(.*)-->\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")
LANGUAGES = ("python", "bash", "text")  # text: shown, never run
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
TIMEOUT_S = 300  # one python block or one bash line
INSTALL = 'pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]"'  # what CI runs (.ci/run), byte for byte
TEST = "python -m pytest"


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason a marker gave, None without a marker

    @property
    def name(self) -> str:
        first = next((line.strip() for line in self.code.splitlines() if line.strip()), "")
        return f"{self.page}:{self.line} {first[:60]}"


def relative(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def parse_blocks(page: Path) -> tuple[list[Block], list[int]]:
    """The fenced blocks of `page`, and the lines of markers that no block follows (each is an error)."""
    blocks, stray_markers = [], []
    lines = page.read_text(encoding="utf-8").splitlines()
    marker: tuple[int, str] | None = None  # (line, reason) of a marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = FENCE.match(line)
        if opening:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            reason = marker[1] if marker else None
            blocks.append(Block(relative(page), i + 1, opening.group(1), "\n".join(lines[i + 1 : end]) + "\n",
                                reason))
            marker, i = None, end + 1
            continue
        found = NOT_RUN.match(line.strip())
        if marker and line.strip():
            stray_markers.append(marker[0])  # something other than a block came after the marker
            marker = None
        if found:
            marker = (i + 1, found.group(1).strip())
        i += 1
    if marker:
        stray_markers.append(marker[0])
    return blocks, stray_markers


BLOCKS = [block for page in PAGES for block in parse_blocks(page)[0]]
RUN_BLOCKS = [b for b in BLOCKS if b.not_run is None and b.language in ("python", "bash")]
MARKED_BLOCKS = [b for b in BLOCKS if b.not_run is not None]


def by_name(blocks: list[Block]):
    return pytest.mark.parametrize("block", blocks, ids=[b.name for b in blocks])


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: `\\`-continued lines joined, blank and comment lines dropped."""
    commands, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def environment(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",  # the blocks run side by side, one core each
        VARTK_HOME=str(folder / ".vartk-home"),  # official names resolve against an empty cache
        HF_MODULES_CACHE=str(folder / ".hf-modules"),  # diffusers copies a folder's pipeline module here
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("VARTK_DEBUG", None)
    return env


def run_bash_block(block: Block, folder: Path) -> str | None:
    """Run a bash block's commands one by one in `folder`; None when they all succeed, else what failed and the end
    of its output."""
    env = environment(folder)
    for command in bash_commands(block.code):
        try:
            done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=folder, env=env, capture_output=True,
                                  text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"{command!r} ran longer than {TIMEOUT_S} s"
        if done.returncode != 0:
            return f"{command!r} exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return None


# Runs each script given on the command line in its own folder and namespace, one after the other, and leaves
# `status` there: "ok", or the traceback. One interpreter for all blocks saves torch's and diffusers' imports.
PYTHON_DRIVER = """
import os, runpy, sys, traceback
for script in sys.argv[1:]:
    os.chdir(os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
        status = "ok"
    except BaseException:
        status = traceback.format_exc()
    with open("status", "w") as f:
        f.write(status)
"""


def run_python_blocks(blocks: list[Block], folders: list[Path]) -> dict[str, str | None]:
    """Run python blocks (each as `block.py` in its folder, in a fresh namespace) in one subprocess; block name ->
    None when it succeeded, else the traceback or the subprocess's output."""
    scripts = []
    for block, folder in zip(blocks, folders):
        (folder / "block.py").write_text(block.code, encoding="utf-8")
        scripts.append(str(folder / "block.py"))
    limit = TIMEOUT_S * len(blocks)
    try:
        done = subprocess.run([sys.executable, "-c", PYTHON_DRIVER, *scripts], cwd=folders[0],
                              env=environment(folders[0].parent), capture_output=True, text=True, timeout=limit)
        output = (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        output = f"the blocks ran longer than {limit} s"
    results = {}
    for block, folder in zip(blocks, folders):
        status = (folder / "status").read_text() if (folder / "status").is_file() else f"did not finish:\n{output}"
        results[block.name] = None if status == "ok" else status
    return results


@pytest.fixture(scope="session")
def block_results(request, tmp_path_factory):
    """Block name -> a function that waits for the block and returns its failure (None: it ran), for the run blocks
    this session selected, all started at once on the machine's cores: each bash block alone, the python blocks
    together."""
    selected = {item.callspec.params["block"].name for item in request.session.items
                if item.originalname == "test_block_runs" and hasattr(item, "callspec")}
    blocks = [block for block in RUN_BLOCKS if block.name in selected]
    pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    results = {}
    python = [block for block in blocks if block.language == "python"]
    if python:
        group = pool.submit(run_python_blocks, python, [tmp_path_factory.mktemp("block") for _ in python])
        results.update({block.name: lambda name=block.name: group.result()[name] for block in python})
    bash = sorted((block for block in blocks if block.language == "bash"), key=lambda b: -len(bash_commands(b.code)))
    for block in bash:  # the longest first, so that the last one to start is short
        results[block.name] = pool.submit(run_bash_block, block, tmp_path_factory.mktemp("block")).result
    yield results
    pool.shutdown(wait=True, cancel_futures=True)


@by_name(RUN_BLOCKS)
def test_block_runs(block, block_results):
    failure = block_results[block.name]()
    assert failure is None, failure


@by_name(MARKED_BLOCKS)
def test_marked_block_says_why(block):
    assert block.not_run, f"{block.name}: write the reason after 'not run:'"


@by_name(BLOCKS)
def test_block_has_a_known_language(block):
    assert block.language in LANGUAGES, (
        f"{block.name}: ```{block.language}; use python or bash (run unless marked) or text (never run)")


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_markers_precede_blocks(page):
    stray = parse_blocks(page)[1]
    assert not stray, f"{relative(page)}: lines {stray} hold a 'not run' marker that no code block follows"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def prose(page: Path) -> list[str]:
    """The lines of `page` outside fenced code blocks."""
    lines, inside = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in prose(page):
        heading = HEADING.match(line)
        if heading:
            anchor = github_anchor(heading.group(1))
            seen[anchor] = seen.get(anchor, -1) + 1
            if seen[anchor]:  # GitHub numbers repeated headings: x, x-1, x-2
                seen[f"{anchor}-{seen[anchor]}"] = 0
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_relative_links_resolve(page):
    broken = []
    for line in prose(page):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{target} (no heading #{anchor} in {relative(file)})")
    assert not broken, f"{relative(page)}: broken links: {broken}"


def test_readme_keeps_the_install_and_test_commands():
    """CI (.ci/run) installs and tests with these commands; the README shows them as they are."""
    commands = [line.split("  #")[0].strip() for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()]
    assert INSTALL in commands and TEST in commands
