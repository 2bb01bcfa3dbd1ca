"""The benchmark's own tests: its arithmetic, and its harnesses end to end against a real Janus (the Debian
package, installed by scripts/system-deps test) inside the tests' namespace."""
