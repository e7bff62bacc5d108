#!/usr/bin/env bash
# Installs a walhook .deb on this machine, checks what it installed, then purges it and
# checks that nothing is left. Needs root on Debian or Ubuntu; .ci/run runs it.
#
#   scripts/test-deb.sh target/debian/walhook_0.1.0-1_amd64.deb
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(realpath "${1:?usage: scripts/test-deb.sh PATH/walhook_VERSION_ARCH.deb}")
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)

fail() {
    echo "test-deb: FAIL: $*" >&2
    exit 1
}
step() { echo "test-deb: $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges the package)"
if dpkg-query -W -f='${Status}' walhook 2>/dev/null | grep -q 'install ok'; then
    fail "walhook is already installed here; this script would purge it"
fi
if getent passwd walhook >/dev/null; then
    fail "a user walhook already exists here; the purge would remove it"
fi

for tool in man systemd-analyze; do
    command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install man-db systemd)"
done

# man-db's trigger re-indexes every manual page on the machine after each install and
# removal, which takes minutes on a big machine; `man walhook` reads the page directly.
# Switched off while this script runs, as `man-db/auto-update false` does.
mandb_flag=/var/lib/man-db/auto-update
if [ -e "$mandb_flag" ]; then
    mv "$mandb_flag" "$mandb_flag.test-deb"
fi
cleanup() {
    if dpkg-query -W -f='${Status}' walhook 2>/dev/null | grep -q 'installed'; then
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq walhook >/dev/null 2>&1 || dpkg -P walhook >/dev/null 2>&1 || true
    fi
    if [ -e "$mandb_flag.test-deb" ]; then
        mv "$mandb_flag.test-deb" "$mandb_flag"
    fi
}
trap cleanup EXIT

step "installing $deb"
# Minimal images tell dpkg to skip man pages (path-exclude); install ours regardless.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o 'Dpkg::Options::=--path-include=/usr/share/man/man1/walhook*' "$deb" >/tmp/test-deb-install.log 2>&1 \
    || { cat /tmp/test-deb-install.log >&2; fail "apt-get install"; }
installed_files=$(dpkg -L walhook)

step "walhook --version"
[ "$(command -v walhook)" = /usr/bin/walhook ] || fail "walhook is $(command -v walhook), not /usr/bin/walhook"
[ "$(walhook --version)" = "walhook $version" ] || fail "walhook --version says '$(walhook --version)', expected 'walhook $version'"

step "man walhook"
page=$(man -P cat walhook 2>/dev/null) || fail "man walhook"
for section in SYNOPSIS "EXIT STATUS" ENVIRONMENT WALHOOK_LOG FILES; do
    grep -q "$section" <<<"$page" || fail "man walhook lacks $section"
done
man -P cat walhook-check 2>/dev/null | grep -q -- --offline || fail "man walhook-check lacks --offline"

step "shell completions"
for f in /usr/share/bash-completion/completions/walhook \
    /usr/share/zsh/vendor-completions/_walhook \
    /usr/share/fish/vendor_completions.d/walhook.fish; do
    [ -s "$f" ] || fail "$f missing"
done
bash -c 'source /usr/share/bash-completion/completions/walhook && complete -p walhook' >/dev/null \
    || fail "the bash completion does not register for walhook"
grep -q 'walhook' /usr/share/zsh/vendor-completions/_walhook || fail "zsh completion"
grep -q 'complete -c walhook' /usr/share/fish/vendor_completions.d/walhook.fish || fail "fish completion"

step "systemd-analyze verify"
for unit in /usr/lib/systemd/system/walhook.service /usr/lib/systemd/system/walhook@.service; do
    [ -f "$unit" ] || fail "$unit missing"
    grep -q '^ExecStart=/usr/bin/walhook run ' "$unit" || fail "$unit does not start /usr/bin/walhook"
    # Default --man=yes: Documentation=man:walhook(1) must resolve too.
    out=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify $unit: $out"
    if grep -i walhook <<<"$out"; then
        fail "systemd-analyze verify $unit warned"
    fi
done

step "the walhook user"
entry=$(getent passwd walhook) || fail "no user walhook"
IFS=: read -r _ _ uid _ _ home shell <<<"$entry"
[ "$uid" -lt 1000 ] || fail "walhook is not a system user (uid $uid)"
[ "$shell" = /usr/sbin/nologin ] || fail "walhook has shell $shell"
[ "$home" = /nonexistent ] || fail "walhook has home $home"
getent group walhook >/dev/null || fail "no group walhook"

step "the conffile"
dpkg-query -W -f='${Conffiles}\n' walhook | grep -q '^ /etc/walhook/walhook.toml ' || fail "/etc/walhook/walhook.toml is not a conffile"
cmp -s /etc/walhook/walhook.toml config.example.toml || fail "/etc/walhook/walhook.toml is not config.example.toml"
[ "$(stat -c '%U:%G %a' /etc/walhook/walhook.toml)" = "root:walhook 640" ] || fail "walhook.toml is $(stat -c '%U:%G %a' /etc/walhook/walhook.toml)"
[ "$(stat -c '%U:%G %a' /etc/walhook)" = "root:walhook 750" ] || fail "/etc/walhook is $(stat -c '%U:%G %a' /etc/walhook)"
# The service's user reads it, and the shipped example is a valid configuration once the
# environment variables it names are set (signing secrets need the whsec_ form).
example_env=()
for name in $(grep -v '^ *#' /etc/walhook/walhook.toml | grep -o '\${[A-Z0-9_]*}' | tr -d '${}' | sort -u); do
    case $name in
        *SECRET*) example_env+=("$name=whsec_$(head -c 32 /dev/urandom | base64)") ;;
        *) example_env+=("$name=test-value") ;;
    esac
done
runuser -u walhook -- env "${example_env[@]}" walhook check --offline --config /etc/walhook/walhook.toml \
    || fail "walhook check --offline of the installed configuration, as user walhook"
[ -s /usr/share/doc/walhook/README.md ] || fail "README missing"
grep -q 'License: Apache-2.0' /usr/share/doc/walhook/copyright || fail "copyright"

step "purge"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq walhook >/tmp/test-deb-purge.log 2>&1 \
    || { cat /tmp/test-deb-purge.log >&2; fail "apt-get purge"; }
if dpkg-query -W -f='${Status}' walhook 2>/dev/null | grep -q 'installed'; then
    fail "still installed after purge"
fi
while IFS= read -r path; do
    # Shared directories (/usr/share/man/man1, …) stay; walhook's own files must not.
    if [ -e "$path" ] && [ ! -d "$path" ]; then
        fail "$path is left after purge"
    fi
done <<<"$installed_files"
[ ! -e /etc/walhook ] || fail "/etc/walhook is left after purge"
! getent passwd walhook >/dev/null || fail "the user walhook is left after purge"
! getent group walhook >/dev/null || fail "the group walhook is left after purge"
! dpkg-statoverride --list | grep -q walhook || fail "a dpkg-statoverride for walhook is left"
step "ok: installed, checked and purged $deb"
