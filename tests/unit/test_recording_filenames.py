"""Track file names carry who is in them: a slug of whatever name a person typed, bounded and safe as a
file name, a store key and a download name, plus the participant id so that two people of one name never
collide."""

from __future__ import annotations

import re

import pytest

from huddle.recording.filenames import MAX_SLUG, safe_id, slug, track_file

SAFE_FILE = re.compile(r"([a-z0-9][a-z0-9-]*-)?p_[0-9a-f]{8}-(audio|video)-[0-9]+\.webm")

HOSTILE = [
    "../etc",
    "../../etc/passwd",
    "..",
    "...",
    ".hidden",
    "a/b\\c",
    "<script>alert(1)</script>",
    "🎉🦄",
    "x" * 500,
    "",
    "   ",
    "\x00\n\r\t",
    "Robert'); DROP TABLE students;--",
    "C:\\CON\\nul.txt",
    "名前",
    "$(rm -rf ~)",
    '"quoted" name',
]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_makes_a_safe_bounded_file_name(name: str) -> None:
    made = slug(name)
    assert re.fullmatch(r"([a-z0-9]+(-[a-z0-9]+)*)?", made), made
    assert len(made) <= MAX_SLUG
    file = track_file(name, "p_1a2b3c4d", "video", 1)
    assert SAFE_FILE.fullmatch(file), file
    assert "/" not in file and "\\" not in file and ".." not in file and not file.startswith(".")
    assert len(file.encode()) < 255  # a file name on every common file system


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Alice", "alice"),
        ("Jean-Luc Picard", "jean-luc-picard"),
        ("Zoë Ångström", "zoe-angstrom"),
        ("../etc", "etc"),
        ("<script>alert(1)</script>", "script-alert-1-script"),
        ("Ada 🎉", "ada"),
        ("🎉", ""),
        ("..", ""),
        ("...", ""),
        ("", ""),
        ("名前", ""),
        ("x" * 500, "x" * MAX_SLUG),
        ("ab " * 200, "ab-" * 10 + "ab"),  # cut at the limit, never ending in "-"
    ],
)
def test_slugs(name: str, expected: str) -> None:
    assert slug(name) == expected


def test_the_file_name_carries_the_name_and_the_id() -> None:
    assert track_file("Alice", "p_1a2b3c4d", "video", 1) == "alice-p_1a2b3c4d-video-1.webm"
    assert track_file("Alice", "p_1a2b3c4d", "audio", 2) == "alice-p_1a2b3c4d-audio-2.webm"
    # Two people called Alice: the id tells their files apart.
    assert track_file("Alice", "p_00000001", "video", 1) != track_file("Alice", "p_00000002", "video", 1)
    # Nothing left of the name: the id alone, as before names were in file names.
    assert track_file("🎉", "p_1a2b3c4d", "video", 1) == "p_1a2b3c4d-video-1.webm"
    assert track_file("", "p_1a2b3c4d", "audio", 1) == "p_1a2b3c4d-audio-1.webm"


def test_records_with_fields_of_the_wrong_type_still_make_a_safe_name() -> None:
    # Records come from a log: a name or an id may be anything JSON holds.
    assert slug(None) == "" and slug(42) == ""
    assert track_file(None, None, "video", 1) == "participant-video-1.webm"
    assert safe_id("../../p") == "_.._p"
    assert safe_id("...") == "participant"
    assert len(safe_id("p" * 500)) == 64
