"""Synthetic participants that speak Huddle's real protocol, for load tests (`huddle loadtest`).

`run_loadtest(LoadtestConfig(...))` in huddle.loadtest.run is the entry point; `SyntheticParticipant` in
huddle.loadtest.participant is one person. Import those modules directly: this package imports nothing, so
that `huddle` stays light to start.
"""

# Load tests are bounded in count and time, and stop by themselves.
MAX_PARTICIPANTS = 200
MAX_DURATION = 600.0
