"""Coverage-guided fuzzing of everything that parses bytes or text from the network (`make fuzz`).

One module per target, each with `one_input(data)`: it feeds `data` to the parser the way the server does
and swallows only the errors that parser documents. Anything else escaping it (IndexError, struct.error,
an assertion on a promised invariant, ...) is a bug, and so is an input that takes over a second.
`python -m fuzz` runs the targets under atheris; tests/unit/test_fuzz_regressions.py replays the committed
corpus (fuzz/corpus/<target>/) and any crash reproducers (fuzz/crashes/) through the same functions.
"""

TARGETS = ("sdp", "stun", "rtp", "rtcp", "dtls", "vp8", "signaling")
