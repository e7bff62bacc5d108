#!/usr/bin/env bash
# Builds the Debian package target/debian/walhook_<version>-1_<arch>.deb (and its debug
# symbols, walhook-dbgsym_<version>-1_<arch>.ddeb) and prints the package's path last.
#
#   scripts/build-deb.sh                        # release build, man pages, completions, cargo deb
#   scripts/build-deb.sh --binary PATH/walhook  # package a binary already built
#   scripts/build-deb.sh --fast                 # further options go to cargo deb
#
# Needs Rust, and dpkg (Debian, Ubuntu); installs cargo-deb when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
if [ "${1:-}" = "--binary" ]; then
    binary=$(realpath "${2:?--binary needs the path of a walhook binary}")
    shift 2
fi

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== installing cargo-deb" >&2
    cargo install --locked cargo-deb >&2
fi

assets=target/package-assets
rm -rf "$assets"
mkdir -p "$assets/systemd"

deb_options=()
if [ -n "$binary" ]; then
    # A binary built elsewhere (CI passes the test build: packaging is what it checks, and
    # a release build would add minutes). cargo-deb packages <target dir>/release/walhook.
    export CARGO_TARGET_DIR=target/deb-prebuilt
    mkdir -p "$CARGO_TARGET_DIR/release"
    cp "$binary" "$CARGO_TARGET_DIR/release/walhook"
    deb_options+=(--strip --fast)
else
    echo "== cargo build --release --locked" >&2
    cargo build --release --locked >&2
    binary=$(cargo metadata --format-version 1 --no-deps --locked \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/walhook
    # A stripped binary in the package, its debug symbols in walhook-dbgsym_*.ddeb.
    deb_options+=(--dbgsym)
fi

echo "== man pages and shell completions" >&2
"$binary" assets --out "$assets" >/dev/null

# The units as packaged: the binary is /usr/bin/walhook (the repository's units name
# /usr/local/bin/walhook, where a hand-built binary goes).
for unit in systemd/*.service; do
    packaged="$assets/systemd/$(basename "$unit")"
    sed 's#^ExecStart=/usr/local/bin/walhook #ExecStart=/usr/bin/walhook #' "$unit" >"$packaged"
    if ! grep -q '^ExecStart=/usr/bin/walhook ' "$packaged"; then
        echo "build-deb: $unit does not start /usr/local/bin/walhook; update this script" >&2
        exit 1
    fi
done

echo "== cargo deb" >&2
cargo deb --no-build --locked "${deb_options[@]}" "$@" >"$assets/cargo-deb.out"
grep -E '/walhook_[^/]*\.deb$' "$assets/cargo-deb.out" | tail -1
