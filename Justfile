# Recipes for the qcow2 engine. `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

PREFIX := "/usr/local"

# Build everything (release: the C library lands in target/release/libqcow2.so)
build:
    cargo build --workspace --release

# Run every test, the C harness included
test:
    cargo test --workspace

# What CI runs
ci:
    bash .ci/run
