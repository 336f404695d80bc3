"""README.md's shell examples, run verbatim, so that the README cannot drift from the program.

Every fenced block of README.md names its language. Each ```bash / ```sh / ```shell / ```console
block runs as one `bash -euo pipefail` script, in the checkout (where `pip install -e .`,
`docker build .` and `docker-compose` expect to be), with HOME, the work dir and so `~/images`,
`~/runs` and `~/.cache/thresher` in a fresh temporary folder. What a block cannot run here is said
in the README itself, in an HTML comment just above the block, one directive a line:

    <!-- readme-test
    skip: REASON                      the whole block is not run (a GPU, a bucket, a cluster, hours)
    skip `TEXT`: REASON               the commands containing TEXT are not run
    instead of `TEXT`: COMMAND        the command containing TEXT is replaced by COMMAND (its small
                                      variant; a `# why` comment at its end is bash's comment)
    before: COMMAND                   runs first: what an earlier section or the prose sets up
    exit: N                           the block ends with exit code N (default 0)
    -->

A block without a marker that needs what a test cannot give (a `...` or `<...>` placeholder, a
GPU, a bucket) fails, so a new README block cannot go untested silently; so does a directive whose
TEXT matches no command. Where the README says what a command produces (a run directory, a line,
the files of the Output section), CHECKS below looks.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from test_docker import docker_engine, image  # noqa: F401  (fixtures: the image, built as .ci/run builds it)

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
BLOCK_TIMEOUT_S = 3600  # a guard against a hang, not a measure: the slowest block takes minutes
DOCKER_WORDS = re.compile(r"\bdocker(-compose)?\b|hydra/launcher=docker")
# What a test cannot give, and how it shows in a command.
NEEDS = {
    "a placeholder to fill in": re.compile(r"(^|\s)\.\.\.(\s|$)|<[a-z][^>]*>"),
    "a GPU": re.compile(r"--gpus\b|hardware=(gpu|multi_gpu)\b|--profile gpu\b"),
    "a bucket": re.compile(r"\b(s3|gs|az)://"),
}


# ---------------------------------------------------------------------------------------------
# Reading the README
# ---------------------------------------------------------------------------------------------
@dataclass
class Command:
    text: str  # as written, continuation lines included
    line: int

    @property
    def flat(self) -> str:
        return re.sub(r"\\\n\s*", " ", self.text)


@dataclass
class Block:
    line: int  # of the opening fence
    language: str
    text: str
    section: str
    directives: List[Tuple[str, str, str]] = field(default_factory=list)  # (kind, TEXT, value)

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"L{self.line}-{slug}"

    def commands(self) -> List[Command]:
        """The block's commands: a console block's `$ ` lines, or every line of a script, with a
        trailing backslash joining the next line."""
        lines = self.text.splitlines()
        if self.language == "console":
            lines = [line[2:] if line.startswith("$ ") else "" for line in lines]
        commands, pending, start = [], [], 0
        for number, line in enumerate(lines, start=self.line + 1):
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not pending:
                start = number
            pending.append(line)
            if not line.rstrip().endswith("\\"):
                commands.append(Command("\n".join(pending), start))
                pending = []
        if pending:
            commands.append(Command("\n".join(pending), start))
        return commands

    def expected_output(self) -> List[str]:
        """A console block's lines that are not commands: what the commands print."""
        if self.language != "console":
            return []
        return [line for line in self.text.splitlines() if line.strip() and not line.startswith("$ ")]

    def directive(self, kind: str) -> Optional[str]:
        values = [value for found, _, value in self.directives if found == kind]
        return values[-1] if values else None


DIRECTIVE = re.compile(r"^(?P<kind>skip|instead of|before|exit)(\s+`(?P<text>[^`]+)`)?\s*:\s*(?P<value>.*)$")


def parse_marker(comment: str, where: str) -> List[Tuple[str, str, str]]:
    body = comment.strip()[len("<!--"):-len("-->")].strip()
    body = re.sub(r"^readme-test:?", "", body).strip()
    directives = []
    for line in body.splitlines():
        if not line.strip():
            continue
        match = DIRECTIVE.match(line.strip())
        if match is None:
            raise ValueError(f"{where}: readme-test directive not understood: {line.strip()!r} (use skip: WHY, "
                             f"skip `TEXT`: WHY, instead of `TEXT`: COMMAND, before: COMMAND or exit: N)")
        kind, text, value = match["kind"], match["text"] or "", match["value"].strip()
        if kind == "instead of" and not text:
            raise ValueError(f"{where}: `instead of` needs the `TEXT` of the command it replaces")
        if kind in ("before", "exit") and text:
            raise ValueError(f"{where}: `{kind}` takes no `TEXT`")
        if not value:
            raise ValueError(f"{where}: readme-test directive without a reason or command: {line.strip()!r}")
        directives.append((kind, text, value))
    return directives


def readme_blocks(text: Optional[str] = None) -> List[Block]:
    """Every fenced block of the README, with the readme-test markers just above it."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, section, index = [], "top", 0
    while index < len(lines):
        line = lines[index]
        heading = re.match(r"^#+\s+(.*)", line)
        if heading:
            section = heading.group(1)
        fence = re.match(r"^```(\S*)\s*$", line)
        if not fence:
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].startswith("```")), None)
        if end is None:
            raise ValueError(f"README.md:{index + 1}: a code fence that is never closed")
        block = Block(index + 1, fence.group(1), "\n".join(lines[index + 1:end]), section)
        block.directives = markers_above(lines, index)
        blocks.append(block)
        index = end + 1
    return blocks


def markers_above(lines: List[str], fence_index: int) -> List[Tuple[str, str, str]]:
    """The readme-test comments between the block and the paragraph before it."""
    directives, i = [], fence_index - 1
    while i >= 0 and (not lines[i].strip() or lines[i].rstrip().endswith("-->")):
        if not lines[i].strip():
            i -= 1
            continue
        start = i
        while start >= 0 and "<!--" not in lines[start]:
            start -= 1
        comment = "\n".join(lines[start:i + 1])
        if not comment.lstrip().startswith("<!-- readme-test"):
            break
        directives = parse_marker(comment, f"README.md:{start + 1}") + directives
        i = start - 1
    return directives


@dataclass
class Script:
    text: str
    skipped: List[str]  # the commands left out, with the README's reason


def script_of(block: Block) -> Script:
    """The bash script a block runs as: its commands, less those marked skip, with the `instead`
    replacements, after the `before` commands. Raises AssertionError for a stale directive or a
    command that cannot run here and says nothing about it."""
    commands = block.commands()
    where = f"README.md:{block.line} ({block.section})"
    lines = [value for kind, _, value in block.directives if kind == "before"]
    skipped = []
    for kind, text, value in block.directives:
        if kind in ("skip", "instead of") and text:
            matching = [command for command in commands if text in command.flat]
            assert matching, f"{where}: readme-test `{kind} `{text}`` matches no command of the block"
            assert kind == "skip" or len(matching) == 1, \
                f"{where}: `instead of `{text}`` matches {len(matching)} commands: make TEXT name one"
    for command in commands:
        reasons = [value for kind, text, value in block.directives if kind == "skip" and text and text in command.flat]
        replacements = [value for kind, text, value in block.directives
                        if kind == "instead of" and text in command.flat]
        if reasons:
            skipped.append(f"{command.flat.strip()}  [{reasons[0]}]")
        elif replacements:
            lines.append(replacements[0])
        else:
            lines.append(command.text)
    text = "\n".join(lines) + "\n"
    for need, pattern in NEEDS.items():
        found = pattern.search(re.sub(r"#[^\n\"']*$", "", text, flags=re.M))
        assert found is None, (
            f"{where}: `{found.group(0).strip()}` needs {need}, which a test cannot give: say so above the "
            f"block (<!-- readme-test: skip `TEXT`: why -->), or give its small variant "
            f"(<!-- readme-test: instead of `TEXT`: COMMAND -->)")
    return Script(text, skipped)


def shell_blocks() -> List[Block]:
    return [block for block in readme_blocks() if block.language in SHELL_LANGUAGES]


def block_params() -> List:
    params = []
    for block in shell_blocks():
        skip_reason = next((value for kind, text, value in block.directives if kind == "skip" and not text), None)
        try:
            uses_docker = skip_reason is None and DOCKER_WORDS.search(script_of(block).text) is not None
        except AssertionError:
            uses_docker = False  # the test says why it cannot run
        marks = [pytest.mark.docker] if uses_docker else []
        params.append(pytest.param(block, marks=marks, id=block.id))
    return params


# ---------------------------------------------------------------------------------------------
# Running a block
# ---------------------------------------------------------------------------------------------
@dataclass
class BlockRun:
    block: Block
    home: Path
    work_dir: Path
    returncode: int
    output: str


def block_environment(tmp_path: Path, with_pip_venv: bool) -> Dict[str, str]:
    """A user's shell in a fresh home: this interpreter's bin first on PATH (thresher, python,
    ray), and, for a block that installs with pip, a venv of its own in front, which sees this
    venv's packages, so that `pip install -e .` installs thresher there and nowhere else."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("THRESHER_", "HYDRA_", "RAY_", "COMPOSE_"))}
    home = tmp_path / "home"
    home.mkdir()
    user_pip_config = Path.home() / ".config" / "pip" / "pip.conf"
    if user_pip_config.is_file() and "PIP_CONFIG_FILE" not in environment:
        environment["PIP_CONFIG_FILE"] = str(user_pip_config)  # this machine's index mirrors, as before
    path = [str(Path(sys.executable).parent)]
    if with_pip_venv:
        path.insert(0, str(pip_venv(tmp_path / "venv") / "bin"))
    environment.update(HOME=str(home), THRESHER_WORK_DIR=str(tmp_path / "runs"), PYTHONUNBUFFERED="1",
                       PATH=os.pathsep.join([*path, environment.get("PATH", "")]),
                       COMPOSE_PROJECT_NAME=f"readme-{uuid.uuid4().hex[:10]}")
    return environment


def pip_venv(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, timeout=600)
    purelib = sysconfig.get_paths()["purelib"]
    site = Path(subprocess.run([str(folder / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "thresher_test_base_venv.pth").write_text(purelib + "\n")
    return folder


def run_block(block: Block, script: Script, tmp_path: Path) -> BlockRun:
    environment = block_environment(tmp_path, with_pip_venv="pip install" in script.text)
    script_file = tmp_path / "block.sh"
    script_file.write_text(script.text)
    process = subprocess.Popen(["bash", "-euo", "pipefail", str(script_file)], cwd=ROOT, env=environment,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"README.md:{block.line}: still running after {BLOCK_TIMEOUT_S}s:\n{tail(output)}", pytrace=False)
    finally:
        if DOCKER_WORDS.search(script.text):
            remove_containers(script.text, environment, tmp_path)
    return BlockRun(block, Path(environment["HOME"]), Path(environment["THRESHER_WORK_DIR"]), process.returncode,
                    output.decode(errors="replace"))


def remove_containers(script: str, environment: Dict[str, str], tmp_path: Path) -> None:
    """Take down what the block's compose files started (its project name is the test's own) and
    any container left mounting the test's folder (a `docker run` whose client was killed)."""
    for compose_file in set(re.findall(r"docker-compose\s+-f\s+(\S+)", script)) | (
            {"docker-compose.yml"} if re.search(r"docker-compose\s+(?!-f)", script) else set()):
        subprocess.run(["docker-compose", "-f", compose_file, "down", "-v", "--remove-orphans"], cwd=ROOT,
                       env=environment, capture_output=True, timeout=300)
    ids = subprocess.run(["docker", "ps", "-aq"], capture_output=True, text=True, timeout=60).stdout.split()
    if not ids:
        return
    inspected = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, timeout=120)
    for container in json.loads(inspected.stdout or "[]"):
        if any(str(mount.get("Source", "")).startswith(str(tmp_path)) for mount in container.get("Mounts", [])):
            subprocess.run(["docker", "rm", "--force", container["Id"]], capture_output=True, timeout=120)


def tail(output: bytes, lines: int = 80) -> str:
    return "\n".join(output.decode(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# What the README says the commands produce
# ---------------------------------------------------------------------------------------------
def summaries(folder: Path) -> Dict[Path, dict]:
    return {path.parent: json.loads(path.read_text()) for path in sorted(folder.rglob("summary.json"))}


def finished_runs(folder: Path) -> Dict[Path, dict]:
    found = summaries(folder)
    unfinished = {str(path): summary.get("status") for path, summary in found.items() if summary.get("status") != "finished"}
    assert not unfinished, f"runs that did not finish: {unfinished}"
    return found


def check_set_up(run: BlockRun) -> None:
    """`thresher` with no arguments: shapes generated into ~/.cache/thresher, one finished run of
    all four stages, holding exactly the files the Output section lists."""
    assert any((run.home / ".cache" / "thresher").glob("shapes-*")), "no shapes dataset in ~/.cache/thresher"
    runs = finished_runs(run.work_dir)
    assert len(runs) == 1, list(runs)
    (run_dir, summary), = runs.items()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_dir.name), run_dir.name  # runs/<UTC timestamp>/
    assert [name for name, stage in summary["stages"].items() if stage["status"] == "finished"] == [
        "scan", "embed", "select", "train"]
    compare_with_output_section(run_dir)


def check_use(run: BlockRun) -> None:
    runs = finished_runs(run.work_dir)
    requested = sorted(tuple(summary["stages_requested"]) for summary in runs.values())
    assert requested.count(("scan", "embed", "select")) == 1, requested
    assert any(path.name.endswith("_tenth") for path in runs), list(runs)  # note=tenth
    assert "\nsampler:\n  method: random\n" in run.output  # --cfg job printed the composed config
    for path, summary in runs.items():
        if summary["stages_requested"] == ["scan", "embed", "select"]:
            assert not (path / "checkpoints").exists()


def check_override_mistake(run: BlockRun) -> None:
    """The README's word: exit code 2 and one line, no traceback."""
    assert "Traceback" not in run.output
    assert len(run.output.strip().splitlines()) == 1, run.output


def check_docker_run(run: BlockRun) -> None:
    runs = finished_runs(run.home / "runs")
    assert len(runs) == 1, list(runs)
    assert (next(iter(runs)) / "checkpoints" / "last.pt").is_file()


def check_compose(run: BlockRun) -> None:
    runs = finished_runs(run.home / "runs")
    assert sorted(tuple(summary["stages_requested"]) for summary in runs.values()) == [
        ("scan", "embed", "select"), ("scan", "embed", "select", "train")]
    for path, summary in runs.items():
        assert len((path / "filenames" / "sampled_filenames.txt").read_text().splitlines()) > 0
        assert (path / "checkpoints").exists() == ("train" in summary["stages_requested"])


def check_docker_sweep(run: BlockRun) -> None:
    sweep_summaries = list(run.work_dir.rglob("sweep_summary.json"))
    assert len(sweep_summaries) == 1, sweep_summaries
    jobs = json.loads(sweep_summaries[0].read_text())
    assert jobs["n_jobs"] == 4 and jobs["n_failed"] == 0, jobs
    for job in jobs["jobs"]:
        assert job["exit_code"] == 0 and job["run_status"] == "finished", job
        assert Path(job["log"]).is_file(), job


def check_optuna(run: BlockRun) -> None:
    results = list(run.work_dir.rglob("optimization_results.yaml"))
    assert len(results) == 1, results
    assert "best_params" in results[0].read_text()


def check_ray_executor(run: BlockRun) -> None:
    (summary,) = finished_runs(run.work_dir).values()
    assert summary["stages_requested"] == ["scan", "embed", "select"]


def check_ray_compose(run: BlockRun) -> None:
    (path, summary), = finished_runs(run.home / "runs").items()
    assert summary["stages_requested"] == ["scan", "embed", "select"]
    assert "Active:" in run.output  # `ray status` listed the nodes


def check_ray_sweep(run: BlockRun) -> None:
    runs = finished_runs(run.work_dir)
    assert len(runs) == 2 and all("multirun" in path.parts for path in runs), list(runs)


def check_training(run: BlockRun) -> None:
    (summary,) = finished_runs(run.work_dir).values()
    assert summary["stages"]["train"]["status"] == "finished"


def check_profiling(run: BlockRun) -> None:
    runs = finished_runs(run.work_dir)
    assert len(runs) == 3, list(runs)
    for path in runs:
        assert json.loads((path / "report.json").read_text())["profile"]["settings"]
    assert "recommended: trainer.batch_size=" in run.output
    pets = run.home / "oxford-iiit-pet"
    assert (pets / "annotations" / "trainval.txt").is_file() and any((pets / "images").iterdir())


# A text that names the block (it must name exactly one), and what to check after it ran.
CHECKS: Dict[str, Callable[[BlockRun], None]] = {
    "pip install -e '.[dev]' && thresher": check_set_up,
    "thresher --cfg job sampler=random": check_use,
    "$ thresher sampler.stopping_condition.n_sample=3": check_override_mistake,
    "docker run --rm --init -e THRESHER_TOKEN": check_docker_run,
    "docker-compose run --rm select ": check_compose,
    "thresher -m hydra/launcher=docker": check_docker_sweep,
    "hydra/sweeper=optuna": check_optuna,
    "thresher executor=ray \"stages=[scan,embed,select]\"": check_ray_executor,
    "docker-compose -f docker-compose.ray.yml up -d": check_ray_compose,
    "thresher -m hydra/launcher=ray ": check_ray_sweep,
    "trainer.scheduler.type=CosineAnnealingLR": check_training,
    "+experiment=profile_fasterrcnn_pets data.root": check_profiling,
}


# ---------------------------------------------------------------------------------------------
# The README's Output section
# ---------------------------------------------------------------------------------------------
@dataclass
class OutputEntry:
    pattern: str  # a file, a folder (ending in /) or a glob, relative to the run directory
    conditional: bool  # "with X": only some runs write it


def output_section_entries() -> List[OutputEntry]:
    """The run directory's listing in the README's Output section, entry by entry."""
    (tree,) = [block for block in readme_blocks() if block.section == "Output" and block.text.startswith("runs/")]
    entries = []
    for line in tree.text.splitlines()[1:]:
        if not line.startswith("  ") or line.startswith("   "):
            continue  # a description's second line
        name = r"(?:\{[^}]*\}|[^\s,{])+"  # `.hydra/{config,overrides,hydra}.yaml` is one
        listing = re.match(rf"(?P<names>{name}(?:, {name})*)\s*(?P<description>.*)", line.strip())
        names, description = listing["names"], listing["description"]
        for name in names.split(", "):
            for expanded in expand_braces(name.strip()):
                entries.append(OutputEntry(expanded.replace("NNN", "[0-9][0-9][0-9]"),
                                           description.strip().startswith("with ")))
    return entries


def expand_braces(name: str) -> List[str]:
    match = re.search(r"\{([^}]*)\}", name)
    if not match:
        return [name]
    return [expanded for option in match.group(1).split(",")
            for expanded in expand_braces(name[:match.start()] + option + name[match.end():])]


def compare_with_output_section(run_dir: Path) -> None:
    """Both ways: every file of the run is listed, and every entry not marked "with ..." is there."""
    entries = output_section_entries()
    files = sorted(path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*") if path.is_file())

    def listed(file: str) -> bool:
        return any(file == entry.pattern or (entry.pattern.endswith("/") and file.startswith(entry.pattern))
                   or fnmatch.fnmatchcase(file, entry.pattern) for entry in entries)

    unlisted = [file for file in files if not listed(file)]
    assert unlisted == [], f"files of a default run that README.md's Output omits: {unlisted}"
    missing = [entry.pattern for entry in entries if not entry.conditional and not any(
        file == entry.pattern or file.startswith(entry.pattern.rstrip("/") + "/") or fnmatch.fnmatchcase(file, entry.pattern)
        for file in files)]
    assert missing == [], f"README.md's Output lists {missing} without a `with ...`, but a default run has none"


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_every_fenced_block_names_its_language():
    unnamed = [f"README.md:{block.line}" for block in readme_blocks() if not block.language]
    assert unnamed == [], "give each block a language: ```bash to run it, ```console for a command " \
                          "and its output, ```text for anything else"


def test_every_check_names_one_readme_block():
    blocks = shell_blocks()
    for text in CHECKS:
        named = [block.line for block in blocks if text in block.text]
        assert len(named) == 1, f"CHECKS[{text!r}] names the blocks at lines {named}, not one"


def test_the_marker_grammar_refuses_what_it_does_not_know():
    blocks = readme_blocks("text\n\n<!-- readme-test: skip `thresher`: why -->\n```bash\nthresher a=1 \\\n"
                           "    b=2\nls\n```\n")
    assert script_of(blocks[0]).text == "ls\n"
    with pytest.raises(ValueError, match="not understood"):
        readme_blocks("<!-- readme-test: ignore: this -->\n```bash\nls\n```\n")
    with pytest.raises(AssertionError, match="matches no command"):
        script_of(readme_blocks("<!-- readme-test: skip `nothing`: why -->\n```bash\nls\n```\n")[0])
    with pytest.raises(AssertionError, match="needs a placeholder"):
        script_of(readme_blocks("```bash\ndocker run ... thresher\n```\n")[0])
    with pytest.raises(AssertionError, match="needs a bucket"):
        script_of(readme_blocks("```bash\nthresher data.input_dir=s3://b/p\n```\n")[0])


@pytest.mark.parametrize("block", block_params())
def test_readme_block_runs_as_written(block: Block, tmp_path, request):
    whole_block_skip = next((value for kind, text, value in block.directives if kind == "skip" and not text), None)
    if whole_block_skip:
        pytest.skip(f"README.md:{block.line}: {whole_block_skip}")
    script = script_of(block)
    if DOCKER_WORDS.search(script.text):
        built = request.getfixturevalue("image")
        if built != "thresher:latest":
            pytest.fail(f"the README's commands run the image `thresher`; THRESHER_IMAGE={built} is another "
                        f"(unset it, or tag it thresher:latest)", pytrace=False)
    run = run_block(block, script, tmp_path)
    expected_exit = int(block.directive("exit") or 0)
    assert run.returncode == expected_exit, (
        f"README.md:{block.line} exited {run.returncode}, not {expected_exit}; it ran:\n{script.text}\n"
        f"output:\n{tail(run.output.encode())}")
    for line in block.expected_output():
        assert line in run.output, f"README.md:{block.line}: the README shows {line!r}; the command printed:\n{run.output}"
    for text, check in CHECKS.items():
        if text in block.text:
            check(run)
    if script.skipped:
        print(f"README.md:{block.line}: not run here:\n  " + "\n  ".join(script.skipped))
