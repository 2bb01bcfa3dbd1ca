# The two commands of the README: `make run` and `make test`. Both set up what is missing first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint clean

run: $(STAMP)
	@$(VENV)/bin/huddle serve

test: $(STAMP)
	scripts/system-deps test
	$(VENV)/bin/ruff check .
	scripts/test-parts $(PYTEST_ARGS)

# Load scenarios against our SFU (and Janus, side by side); one table, JSON under bench/results/.
.PHONY: bench
bench: $(STAMP)
	scripts/system-deps test
	scripts/in-netns $(PY) -m bench.run $(BENCH_ARGS)

# A 50-person call for 30 minutes with people coming and going: the server's memory, files and tasks must
# not grow (bench/soak.py). Not part of `make test`; SOAK_ARGS="--minutes 4 --settle 1" for a short try.
.PHONY: soak
soak: $(STAMP)
	scripts/system-deps test
	scripts/in-netns $(PY) -m bench.soak $(SOAK_ARGS)

# Coverage-guided fuzzing of the parsers (fuzz/, atheris): FUZZ_SECONDS per target, FUZZ_TARGETS="sdp stun" for
# some. Fails on a crash or a hang, with the reproducer in fuzz/crashes/. Not part of `make test`.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz: $(STAMP)
	$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q -e '.[fuzz]'
	nice -n 10 $(PY) -m fuzz --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(STAMP): pyproject.toml setup.py huddle/rtc/_fastpath.c huddle/rtc/_fastpath.h huddle/sfu/_rewrite.c
	scripts/system-deps run
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
