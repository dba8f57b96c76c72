"""The docs' demo tables are the current code's: re-run each and compare (run by .ci/run).

A table the code produced stands in README.md or a page of docs/ (PAGES; today docs/demo.md)
between two markers that name its command:

    <!-- demo-table: megatron-gbl demo --seed 0 -->
    | ... the table `megatron-gbl demo --seed 0` printed ... |
    <!-- /demo-table -->

    python scripts/check_readme_tables.py            # re-run every marked command, compare
    python scripts/check_readme_tables.py --update   # re-run and write the fresh tables in

Every row is compared as printed, except those that time the machine ("seconds per step"),
and exits 1 naming the rows that differ. Commands run in this Python environment (its
`megatron-gbl`), one after the other, each into a temporary --out directory.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", ROOT / "docs" / "demo.md")
BLOCK = re.compile(r"(<!-- demo-table: (?P<command>.+?) -->\n)(?P<table>.*?)(<!-- /demo-table -->)",
                   re.S)
TIMING_ROWS = ("seconds per step",)


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def compared(lines: list[str]) -> dict[str, str]:
    """Row name -> its cells, whitespace-normalised, timing rows left out."""
    rows = {}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not any(cells[0].startswith(name) for name in TIMING_ROWS):
            rows[cells[0]] = " | ".join(cells[1:])
    return rows


def run(command: str) -> str:
    words = shlex.split(command)
    if words[:2] != ["megatron-gbl", "demo"]:
        raise SystemExit(f"check_readme_tables: {command!r}: only `megatron-gbl demo ...` tables")
    with tempfile.TemporaryDirectory() as out:
        started = time.monotonic()
        print(f"--- {command}", file=sys.stderr, flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "megatron_gbl_lab.cli", *words[1:], "--out", out,
             "--no-progress"], capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"check_readme_tables: {command!r} failed:\n{result.stderr[-3000:]}")
        print(f"    {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return "\n".join(table_lines(result.stdout)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true",
                        help="write the fresh tables into their pages instead of comparing")
    args = parser.parse_args(argv)
    texts = {page: page.read_text() for page in PAGES}
    blocks = [(page, block) for page, text in texts.items() for block in BLOCK.finditer(text)]
    if not blocks:
        raise SystemExit("check_readme_tables: no page of " + ", ".join(map(str, PAGES))
                         + " marks a demo table")
    stale = []
    for page, block in blocks:
        fresh = run(block["command"])
        if args.update:
            texts[page] = texts[page].replace(block.group(0),
                                              block.group(1) + fresh + block.group(4))
            continue
        committed, current = compared(table_lines(block["table"])), compared(table_lines(fresh))
        differing = [row for row in committed.keys() | current.keys()
                     if committed.get(row) != current.get(row)]
        for row in differing:
            stale.append(f"{page.name}: {block['command']}: {row!r}\n"
                         f"    page: {committed.get(row)}\n    code: {current.get(row)}")
    if args.update:
        for page, text in texts.items():
            page.write_text(text)
        print(f"check_readme_tables: {len(blocks)} table(s) written into their pages")
        return 0
    if stale:
        print("check_readme_tables: tables differ from the code's output "
              "(scripts/check_readme_tables.py --update writes the current ones):\n"
              + "\n".join(stale), file=sys.stderr)
        return 1
    print(f"check_readme_tables: {len(blocks)} table(s) match the code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
