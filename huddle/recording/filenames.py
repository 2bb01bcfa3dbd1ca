"""The names of per-track recording files: who is in them, in a form safe anywhere a file name goes.

A track file is `<name>-<participant id>-<label>-<n>.webm`: `<name>` a slug of the participant's display
name (so that a folder of files says whose they are), the participant id (so that two people called Alice
never share a file name), `<label>` what the track is ("audio", "video", "screen"...) and n counting from 1
per participant and label (a leave and rejoin makes a new file). A display name is whatever a person typed:
the slug keeps ASCII letters and digits only (accents folded: "Zoë" → "zoe"), lower case, runs of anything
else become one "-", at most `MAX_SLUG` characters. So it never holds "/", "\\", "..", a leading dot, a
space or a character a store key, a shell or a Content-Disposition header would need quoted. A name with
nothing left (emoji only, say) leaves the file as `<participant id>-<label>-<n>.webm`.

The node's in-process writer and the Kafka record consumer both name files through `TrackWriter`, which
names them here, so both write the same names from the same records (a replay rewrites the same files).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_SLUG", "safe_id", "slug", "track_file"]

MAX_SLUG = 32
MAX_ID = 64
# Only this much of a name is looked at: a name can be any length, and NFKD may make it longer still.
_MAX_INPUT = 8 * MAX_SLUG
_WORD = re.compile(r"[a-z0-9]+")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


def slug(text: object, limit: int = MAX_SLUG) -> str:
    """`text` as lowercase ASCII words joined by "-", at most `limit` characters; "" when nothing is left
    (and for anything that is not a string)."""
    if not isinstance(text, str):
        return ""
    folded = unicodedata.normalize("NFKD", text[:_MAX_INPUT]).encode("ascii", "ignore").decode("ascii")
    return "-".join(_WORD.findall(folded.lower()))[:limit].rstrip("-")


def safe_id(participant_id: object) -> str:
    """A participant id as it goes into a file name: ids are `p_<hex>` here, but records come from a log."""
    text = participant_id if isinstance(participant_id, str) else ""
    return _UNSAFE_ID.sub("_", text)[:MAX_ID].lstrip(".") or "participant"


def track_file(name: object, participant_id: object, label: str, number: int) -> str:
    """The file name of a participant's `number`th track of `label` ("audio", "video", "screen"...)."""
    who = safe_id(participant_id)
    named = slug(name)
    return f"{named}-{who}-{label}-{number}.webm" if named else f"{who}-{label}-{number}.webm"
