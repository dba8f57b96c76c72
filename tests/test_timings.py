"""Every time the README, docs/ and the scripts quote is docs/timings.json's
(scripts/timings.py)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import timings  # noqa: E402

from megatron_gbl_lab import runs  # noqa: E402


def test_every_quoted_time_is_the_timings_file_s():
    assert timings.problems(timings.load()) == []


def test_every_time_says_what_it_was_measured_under():
    for name, entry in timings.load().items():
        assert {"command", "seconds", "cores", "load_average", "measured",
                "quoted_in"} <= set(entry), name
        for other in entry["also_measured"]:
            assert {"seconds", "cores", "load_average", "measured"} <= set(other), name


def test_the_demo_s_help_states_the_same_time():
    # `megatron-gbl demo --help` gives the tiny preset's seconds per run: the default demo has 2.
    demo = timings.load()["demo"]["seconds"]
    assert abs(2 * runs.PRESET_SECONDS_PER_RUN["tiny"] - demo) <= 5


def test_words_round_as_people_do():
    assert [timings.about(s) for s in (49, 76, 90, 150, 270, 2667, 6988)] == [
        "about 49 s", "about 76 s", "about 2 min", "about 3 min", "about 5 min", "about 44 min",
        "about 2 hours"]


def test_a_stale_or_unknown_time_is_found(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text("")
    (tmp_path / "README.md").write_text("demo # about 3 min on 2\n# cores; suite: ~9 min\n")
    monkeypatch.setattr(timings, "ROOT", tmp_path)
    entries = {"demo": {"seconds": 170, "cores": 2, "quoted_in": ["README.md"]}}
    assert timings.problems(entries) == [
        "README.md: '~9 min' is no time of docs/timings.json quoted there"]
    entries["demo"]["seconds"] = 300  # the file changed, the README did not
    assert [problem.split(":")[1].strip() for problem in timings.problems(entries)] == [
        "demo should read 'about 5 min on 2 cores' (300 s, docs/timings.json)",
        "'about 3 min' is no time of docs/timings.json quoted there",
        "'~9 min' is no time of docs/timings.json quoted there"]
