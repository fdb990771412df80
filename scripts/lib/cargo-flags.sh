# Sourced by the test scripts: one feature set for every build of the suite (tests, fault suite,
# examples, board), so cargo resolves and compiles the dependency tree once, not once per
# command. The bench harness (its peers' dependency trees) is built only by scripts/bench.sh.
# shellcheck shell=bash
SUITE_FLAGS=(--workspace --exclude apalis-pgmq-notify-bench --all-features)
