"""The shape of file_relay.py: its bannered sections come in order, and none of the
relay's own sections uses a later one (the client and command line are the relay's
users, and come last)."""

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "file_relay.py"
ORDER = [
    "Constants",
    "Small helpers",
    "Options",
    "Storage",
    "S3 storage",
    "Shared counters",
    "gunicorn and Bottle",
    "Web application",
    "Logging",
    "Server",
]


def sections() -> list[tuple[int, str]]:
    """(first line, title) of each bannered section."""
    lines = SOURCE.read_text().splitlines()
    found = []
    for number, line in enumerate(lines[:-1], start=1):
        if line.startswith("# ----") and re.match(r"# [A-Za-z`]", lines[number]):
            found.append((number, lines[number][2:]))
    return found


def section_of(line: int, banners: list) -> str:
    title = ""
    for start, name in banners:
        if start <= line:
            title = name
    return title


def test_the_sections_come_in_order():
    titles = [title for _, title in sections()]
    positions = [next(i for i, title in enumerate(titles) if title.startswith(name)) for name in ORDER]
    assert positions == sorted(positions), titles


def test_no_section_of_the_relay_uses_a_later_one():
    banners = sections()
    rank = {name: i for i, name in enumerate(ORDER)}

    def rank_of(line: int) -> int | None:
        title = section_of(line, banners)
        return next((rank[name] for name in ORDER if title.startswith(name)), None)

    tree = ast.parse(SOURCE.read_text())
    defined = {}
    for node in tree.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
        for name in names:
            defined[name] = rank_of(node.lineno)
    problems = []
    for node in tree.body:
        own = rank_of(node.lineno)
        if own is None or not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            continue
        for used in ast.walk(node):
            if isinstance(used, ast.Name) and defined.get(used.id) is not None and defined[used.id] > own:
                problems.append(f"line {used.lineno}: {ORDER[own]} uses {used.id} ({ORDER[defined[used.id]]})")
    assert not problems, "\n".join(sorted(set(problems)))
