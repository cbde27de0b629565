"""README and docs/*.md for a first-time user: no process words, no undefined aliases, each table beside its evidence.

A reader cannot ask what "RN160" or "the issue's goal" meant, nor re-make a table nobody said how to make. So the
user pages name each artefact once (or define the name in docs/glossary.md), and every Markdown table is followed,
within a few lines, by a link to a committed evidence file or by the command that re-makes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_docs import EXTERNAL, LINK, ROOT

# Words about how the project was run, which mean nothing to a user of the package.
PROCESS_WORDS = (
    r"\bissue('s)?\b",
    r"\bthrowaway\b",
    r"\blent to\b",
    r"\btransfer limit\b",
    r"\bsessions?\b",
    r"\b(this|previous|earlier) release('s|s)?\b",
    r"\bstop(ped)?\b",
)
# Names that stood for different artefacts on different pages, or for nothing a reader could look up.
ALIASES = (
    "RN160",
    "QN160",
    "RNX",
    "QN",
    "RN",
    "S_REPVGG",
    "S_QAREP",
    "PLANTED",
    "HURT",
    "SYN1BIG",
    "SYN1LOO",
    "SYN1",
    "SYN2",
    "DATA",
    "DATA160",
    "DATA320",
    "DATA640",
    "HELD160",
    "HELD320",
    "V512",
    "COCO128",
)
GLOSSARY = Path("docs") / "glossary.md"
GLOSSARY_ENTRY = re.compile(r"^- \*\*([^*]+)\*\*", flags=re.M)
# A command that re-makes a table from the repository.
COMMAND = re.compile(r"qarep-det |python (tools|benchmarks)/|python -m pytest")
EVIDENCE_LOOKAHEAD = 6
TABLE_SEPARATOR = re.compile(r"^\|\s*:?-{3,}")
MAKE_DATASET = re.compile(r"make[-_]dataset(?:\.py)?((?: --[\w-]+ [^\s`]+)+)")
FLAG = re.compile(r"--([\w-]+) ([^\s`]+)")


def user_pages(root: Path) -> list[Path]:
    """README.md and the top-level pages of docs/ (the generated reports in its subfolders are evidence themselves)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def glossary_names(root: Path) -> set[str]:
    """The names docs/glossary.md defines: the bold name that opens each of its list items."""
    glossary = root / GLOSSARY
    return set(GLOSSARY_ENTRY.findall(glossary.read_text(encoding="utf-8"))) if glossary.exists() else set()


def process_words(root: Path) -> list[str]:
    """'page:line: match' for each process word in a user page, code included."""
    patterns = [re.compile(word, flags=re.I) for word in PROCESS_WORDS]
    return [
        f"{page.relative_to(root)}:{number}: {match.group(0)}"
        for page in user_pages(root)
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for pattern in patterns
        for match in pattern.finditer(line)
    ]


def undefined_aliases(root: Path) -> list[str]:
    """'page:line: alias' for each alias a user page uses that the glossary does not define (case-sensitive)."""
    undefined = [alias for alias in ALIASES if alias not in glossary_names(root)]
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, undefined)) + r")(?![\w-])")
    return [
        f"{page.relative_to(root)}:{number}: {match.group(1)}"
        for page in user_pages(root)
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for match in pattern.finditer(line)
    ]


def table_ends(lines: list[str]) -> list[int]:
    """Index of the last row of each Markdown table (a header row, then a |---| separator), outside fenced code."""
    lines = [line.lstrip() for line in lines]  # a table may sit indented in a list item
    ends, fenced, index = [], False, 0
    while index < len(lines):
        line = lines[index]
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("|") and index + 1 < len(lines) and TABLE_SEPARATOR.match(lines[index + 1]):
            index += 1
            while index + 1 < len(lines) and lines[index + 1].startswith("|"):
                index += 1
            ends.append(index)
        index += 1
    return ends


def is_evidence_link(page: Path, target: str, root: Path) -> bool:
    """A relative link to a file or folder of the repository that is not itself a user page."""
    if EXTERNAL.match(target):
        return False
    path = (page.parent / target.split("#", 1)[0]).resolve()
    return path.exists() and path not in {p.resolve() for p in user_pages(root)}


PUBLISHED = re.compile(r"^Source: \[[^\]]+\]\(https://", re.M)  # published figures: their public source is the evidence


def tables_without_evidence(root: Path) -> list[str]:
    """'page:line' of each table with neither an evidence link, a command, nor (for published figures) a
    ``Source: [...](https://...)`` line in the lines right after it."""
    missing = []
    for page in user_pages(root):
        lines = page.read_text(encoding="utf-8").splitlines()
        for end in table_ends(lines):
            after = []
            for line in lines[end + 1 : end + 1 + EVIDENCE_LOOKAHEAD]:
                if line.lstrip().startswith(("|", "#")):
                    break
                after.append(line)
            text = "\n".join(after)
            links = LINK.findall(text)
            cited = PUBLISHED.search(text)
            if not (COMMAND.search(text) or cited or any(is_evidence_link(page, target, root) for target in links)):
                missing.append(f"{page.relative_to(root)}:{end + 1}")
    return missing


def test_no_process_words() -> None:
    assert process_words(ROOT) == []


def test_no_alias_without_a_glossary_entry() -> None:
    assert undefined_aliases(ROOT) == []


def test_every_table_has_its_evidence_right_after_it() -> None:
    assert tables_without_evidence(ROOT) == []


def make_dataset_commands(text: str) -> list[dict[str, str]]:
    """The flags of each `make-dataset` / `make_dataset.py` command in a page, lines and continuations joined."""
    flat = re.sub(r"\\?\n\s*", " ", text)
    return [dict(FLAG.findall(flags)) for flags in MAKE_DATASET.findall(flat)]


def test_each_data_set_is_made_by_one_command_which_the_glossary_gives() -> None:
    """A set named by `--out NAME` is made with the same flags (the seed above all) wherever it is named."""
    made: dict[str, set[frozenset]] = {}
    for page in user_pages(ROOT):
        for flags in make_dataset_commands(page.read_text(encoding="utf-8")):
            if flags.get("out", "").islower():
                made.setdefault(flags["out"], set()).add(frozenset(flags.items()))
    in_glossary = {
        flags["out"]: frozenset(flags.items())
        for flags in make_dataset_commands((ROOT / GLOSSARY).read_text(encoding="utf-8"))
    }
    assert made, "no make-dataset command found"
    assert {name: commands for name, commands in made.items() if len(commands) > 1} == {}
    assert {name for name in made if name not in in_glossary or name not in glossary_names(ROOT)} == set()
    assert {name for name, commands in made.items() if commands != {in_glossary[name]}} == set()


def write_pages(root: Path, readme: str, glossary: str = "# Glossary\n") -> None:
    """A minimal repository: README.md, docs/glossary.md and one evidence file."""
    (root / "docs" / "runs").mkdir(parents=True)
    (root / "docs" / "runs" / "results.json").write_text("{}", encoding="utf-8")
    (root / "docs" / "glossary.md").write_text(glossary, encoding="utf-8")
    (root / "README.md").write_text(readme, encoding="utf-8")


TABLE = "| a | b |\n|---|---:|\n| x | 1 |\n"


def test_the_checks_see_a_table_without_evidence_a_process_word_and_an_alias(tmp_path: Path) -> None:
    readme = (
        "# T\n\n" + TABLE + "\nMeasured on the Xeon; see [the glossary](docs/glossary.md).\n\n"  # a page: no evidence
        "## With a link\n\n" + TABLE + "\nJSON: [results.json](docs/runs/results.json)\n\n"
        "## With a command\n\n" + TABLE + "\n```bash\nqarep-det ptq-eval --weights RN --data data.yaml\n```\n\n"
        "## Too far\n\n" + TABLE + "\n" * 7 + "`python tools/ptq_eval.py`\n\n"
        "- an indented table:\n\n" + "".join(f"  {row}\n" for row in TABLE.splitlines()) + "\n  no command\n\n"
        "The issue's goal was met; this release stopped.\n"
    )
    write_pages(tmp_path, readme)
    assert tables_without_evidence(tmp_path) == ["README.md:5", "README.md:31", "README.md:45"]
    assert [hit.split(": ")[1] for hit in process_words(tmp_path)] == ["issue's", "this release", "stopped"]
    assert undefined_aliases(tmp_path) == ["README.md:24: RN"]


def test_an_alias_the_glossary_defines_is_allowed(tmp_path: Path) -> None:
    write_pages(tmp_path, "Train RN and DATA.\n", glossary="# Glossary\n\n- **RN**: `qarep-det train ...`\n")
    assert undefined_aliases(tmp_path) == ["README.md:1: DATA"]
