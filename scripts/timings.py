"""Every time the README, docs/ and the scripts quote comes from docs/timings.json.

    python scripts/timings.py           # each quoted time's words and where they stand
    python scripts/timings.py --check   # exit 1 when a file's words differ from the file's

docs/timings.json holds, per command, the seconds quoted, the cores and the load average they
were measured under, when and on what code, and other measurements beside it. The words are
`words(entry)`: "about 3 min on 2 cores". tests/test_timings.py runs the check: every entry's
words stand in each file it names, and every "about N s/min/hours" (or "~N min") in README.md,
docs/*.md, scripts/ and .ci/run is the words of an entry quoted there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = ROOT / "docs" / "timings.json"
QUOTED = re.compile(r"(?:about|~) ?(\d+) (s|min|minutes|hours?)\b")


def about(seconds: float) -> str:
    """A time as the README says it: "about 50 s", "about 3 min", "about 2 hours"."""
    def rounded(value: float) -> int:  # half up, as people round (round() halves to even)
        return int(value + 0.5)

    if seconds < 90:
        return f"about {rounded(seconds)} s"
    if seconds < 100 * 60:
        return f"about {rounded(seconds / 60)} min"
    return f"about {rounded(seconds / 3600)} hours"


def words(entry: dict) -> str:
    return f"{about(entry['seconds'])} on {entry['cores']} cores"


def load() -> dict:
    return json.loads(TIMINGS.read_text())["timings"]


def scanned_files() -> list[Path]:
    """The files whose quoted times must all come from docs/timings.json."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "scripts").glob("*.sh")), *sorted((ROOT / "scripts").glob("*.py")),
            ROOT / ".ci" / "run"]


def flowing(text: str) -> str:
    """Text with comment and line breaks joined, so that words broken over lines are found."""
    return re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)


def problems(timings: dict) -> list[str]:
    found = []
    allowed: dict[Path, set[str]] = {}
    for name, entry in timings.items():
        for relative in entry["quoted_in"]:
            path = ROOT / relative
            allowed.setdefault(path, set()).add(about(entry["seconds"]))
            if words(entry) not in flowing(path.read_text()):
                found.append(f"{relative}: {name} should read {words(entry)!r} "
                             f"({entry['seconds']} s, docs/timings.json)")
    for path in scanned_files():
        if path == Path(__file__).resolve():
            continue
        for match in QUOTED.finditer(flowing(path.read_text())):
            said = "about " + match.group(0).lstrip("~ ").removeprefix("about ")
            if said not in allowed.get(path, set()):
                found.append(f"{path.relative_to(ROOT)}: {match.group(0)!r} is no time of "
                             "docs/timings.json quoted there")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the words differ")
    args = parser.parse_args(argv)
    timings = load()
    if args.check:
        found = problems(timings)
        print("\n".join(found) or "timings: every quoted time is docs/timings.json's",
              file=sys.stderr if found else sys.stdout)
        return 1 if found else 0
    for name, entry in timings.items():
        print(f"{name}: {words(entry)!r} in {', '.join(entry['quoted_in'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
