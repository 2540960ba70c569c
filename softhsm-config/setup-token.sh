#!/usr/bin/env bash
# Usage: setup-token.sh DIR LABEL SOPIN USERPIN
#
# Makes a private SoftHSM2 instance in DIR: writes DIR/softhsm2.conf (from softhsm2.conf.in) and DIR/tokens/,
# then initializes a token labelled LABEL with the given SO and user PINs. Re-running with the same LABEL
# reuses the existing token (its objects and PINs are left as they are).
#
# stdout carries exactly one line, the export to use, so this works:
#   eval "$(softhsm-config/setup-token.sh ./hsm "my token" 12345678 123456)"
# Progress messages go to stderr.
set -euo pipefail

if [[ $# -ne 4 ]]; then
    echo "usage: $0 DIR LABEL SOPIN USERPIN" >&2
    exit 2
fi
dir=$1 label=$2 so_pin=$3 user_pin=$4
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if ! command -v softhsm2-util >/dev/null; then
    echo "setup-token.sh: softhsm2-util not found; run scripts/install-deps.sh (or apt-get install softhsm2)" >&2
    exit 1
fi
if [[ -z $label || ${#label} -gt 32 ]]; then
    echo "setup-token.sh: LABEL must be 1 to 32 characters: '$label'" >&2
    exit 2
fi

mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf="$dir/softhsm2.conf"
# '|' cannot appear in the sed replacement unescaped; refuse it rather than write a broken file.
if [[ $dir == *'|'* || $dir == *'&'* ]]; then
    echo "setup-token.sh: DIR must not contain '|' or '&': $dir" >&2
    exit 2
fi
sed "s|@TOKENDIR@|$dir/tokens|" "$here/softhsm2.conf.in" > "$conf"
export SOFTHSM2_CONF=$conf

# Labels are shown space-padded to 32 characters.
existing=$(softhsm2-util --show-slots | sed -n 's/^ *Label: *//p' | sed 's/ *$//')
if grep -qxF -- "$label" <<<"$existing"; then
    echo "setup-token.sh: reusing token '$label' in $dir/tokens" >&2
else
    softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$user_pin" >&2
    echo "setup-token.sh: initialized token '$label' in $dir/tokens" >&2
fi

printf 'export SOFTHSM2_CONF=%q\n' "$conf"
