#!/usr/bin/env bash
# Builds the Debian packages (scripts/package.sh) and checks them: their files, modes and control fields;
# that the binaries are stripped and the debug package holds their debug information under their build IDs
# and .gnu_debuglink; then installs both into a throwaway root with `dpkg --root` (this machine's own
# system is not touched) and uses what was installed: pkcs11-tool -L through the installed module with the
# shipped p11shim.toml as it is (SoftHSM2, on a token of its own), `p11shim --help`, the man pages through
# man -l, the bash completion in bash, the p11-kit module file disabled and enabled; finally purges it.
#
# Usage: bash scripts/test-package.sh      (as root, on Debian 12, after scripts/install-deps.sh)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

work=$(mktemp -d)
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT

step() { printf '  - %s\n' "$*"; }
fail() {
    echo "test-package: $*" >&2
    exit 1
}

mapfile -t built < <(bash scripts/package.sh "$work/out")
deb=${built[0]}
dbgsym=${built[1]}
version=$(sed -n '/^\[package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
[[ $(basename "$deb") == "p11shim_${version}_$arch.deb" ]] || fail "unexpected package name: $deb"
ls -l "$deb" "$dbgsym"

step "control fields"
field() { dpkg-deb -f "$deb" "$1"; }
[[ $(field Package) == p11shim && $(field Version) == "$version" && $(field Architecture) == "$arch" ]] ||
    fail "Package/Version/Architecture: $(dpkg-deb -f "$deb" Package Version Architecture)"
[[ $(field Depends) == *"libc6 (>= "* ]] || fail "Depends without libc6 (>= …): $(field Depends)"
for f in Maintainer Section Priority Installed-Size Description; do
    [[ -n $(field "$f") ]] || fail "no $f field"
done
[[ $(dpkg-deb -f "$dbgsym" Depends) == "p11shim (= $version)" ]] || fail "dbgsym Depends"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
[[ $conffiles == $'/etc/p11shim/p11shim.toml\n/etc/pkcs11/modules/p11shim.module' ]] ||
    fail "conffiles: $conffiles"
grep -qx './md5sums' <<<"$(dpkg-deb --ctrl-tarfile "$deb" | tar -t)" || fail "no md5sums"

step "files and modes (dpkg-deb -c)"
listing=$(dpkg-deb -c "$deb")
expect() { # MODE PATH
    grep -qE "^$1 root/root +[0-9]+ [0-9-]+ [0-9:]+ \./$2\$" <<<"$listing" || fail "not in the package as $1: $2"
}
expect -rwxr-xr-x "usr/lib/$multiarch/pkcs11/p11shim.so"
expect -rwxr-xr-x usr/bin/p11shim
expect -rw-r--r-- etc/p11shim/p11shim.toml
expect -rw-r--r-- etc/pkcs11/modules/p11shim.module
expect drwxr-x--- var/lib/p11shim/
for page in p11shim p11shim-mbk p11shim-mbk-create p11shim-backup p11shim-restore p11shim-verify \
    p11shim-user p11shim-audit-verify; do
    expect -rw-r--r-- "usr/share/man/man1/$page.1.gz"
done
expect -rw-r--r-- usr/share/bash-completion/completions/p11shim
expect -rw-r--r-- usr/share/zsh/vendor-completions/_p11shim
expect -rw-r--r-- usr/share/fish/vendor_completions.d/p11shim.fish
for f in copyright changelog.gz README.Debian README.md.gz; do
    expect -rw-r--r-- "usr/share/doc/p11shim/$f"
done
! grep -q generate-docs <<<"$listing" || fail "a page of the hidden generate-docs command"
! grep -v ' root/root ' <<<"$listing" | grep -q . || fail "files not owned by root/root"

step "install into a throwaway root (dpkg --root)"
sysroot=$work/root
install -d "$sysroot/var/lib/dpkg/info" "$sysroot/var/lib/dpkg/updates"
touch "$sysroot/var/lib/dpkg/status"
# The throwaway root has no libc6 package: its dependencies are this machine's.
dpkg_said=$(dpkg --root="$sysroot" --force-depends -i "$deb" "$dbgsym" 2>&1) || fail "dpkg -i: $dpkg_said"
dpkg --root="$sysroot" -s p11shim | grep -qx 'Status: install ok installed' || fail "not installed"
module=$sysroot/usr/lib/$multiarch/pkcs11/p11shim.so
cli=$sysroot/usr/bin/p11shim

step "stripped, with the debug information in p11shim-dbgsym by build ID and .gnu_debuglink"
for elf in "$module" "$cli"; do
    sections=$(readelf -S --wide "$elf")
    ! grep -qE '\.(debug_info|debug_line|symtab) ' <<<"$sections" || fail "$elf is not stripped"
    id=$(readelf -n "$elf" | sed -n 's/^ *Build ID: *//p')
    debug=$sysroot/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
    [[ -f $debug ]] || fail "no debug file for $elf (build ID $id)"
    [[ $(readelf -n "$debug" 2>/dev/null | sed -n 's/^ *Build ID: *//p') == "$id" ]] ||
        fail "$debug: another build ID"
    debug_sections=$(readelf -S --wide "$debug" 2>/dev/null)
    grep -q '\.debug_line ' <<<"$debug_sections" || fail "$debug has no line tables"
    objcopy --dump-section .gnu_debuglink="$work/debuglink" "$elf" "$work/scratch"
    python3 - "$work/debuglink" "$debug" <<'EOF' || fail "$elf: .gnu_debuglink does not match $debug"
import os, sys, zlib
link = open(sys.argv[1], "rb").read()
name = link[: link.index(b"\0")].decode()
crc = int.from_bytes(link[-4:], "little")
actual = zlib.crc32(open(sys.argv[2], "rb").read())
sys.exit(0 if name == os.path.basename(sys.argv[2]) and crc == actual else 1)
EOF
done
ls -l "$module" "$root/${CARGO_TARGET_DIR:-target}/release/libp11shim.so" 2>/dev/null || true
if command -v gdb >/dev/null; then
    # gdb finds the installed debug file by the build ID: a function's source file and line.
    found=$(timeout 120 gdb -batch -nx -iex "set debug-file-directory $sysroot/usr/lib/debug" \
        -ex 'info functions ^p11shim::config::Config::parse$' "$cli" 2>&1)
    grep -qE '^[0-9]+:.*p11shim::config::Config::parse' <<<"$found" || fail "gdb finds no debug information: $found"
fi

step "pkcs11-tool -L through the installed module, with the shipped p11shim.toml as it is"
label=p11shim-package
eval "$(softhsm-config/setup-token.sh "$work/hsm" "$label" 12345678 123456 2>/dev/null)"
listed=$(P11SHIM_CONFIG=$sysroot/etc/p11shim/p11shim.toml pkcs11-tool --module "$module" -L)
grep -qE "token label +: $label\$" <<<"$listed" || fail "the token is not listed: $listed"
info=$(P11SHIM_CONFIG=$sysroot/etc/p11shim/p11shim.toml pkcs11-tool --module "$module" --show-info 2>&1)
grep -qi 'manufacturer.*p11shim' <<<"$info" || fail "not the shim: $info"

step "the same with every key the shipped p11shim.toml shows commented out taken in"
sed -E 's/^# ((log_file|log_level|mode|hsm_cache|token|storage|default_group|lockout_after|delay|delay_max) = )/\1/
        s/^# (\[\[slot\]\]|\[logon\])$/\1/' "$sysroot/etc/p11shim/p11shim.toml" |
    sed "s|^log_file = .*|log_file = \"$work/p11shim.log\"|" >"$work/every-key.toml"
taken=$(grep -cE '^(log_file|log_level|mode|hsm_cache|token|storage|default_group|lockout_after|delay|delay_max) = ' \
    "$work/every-key.toml")
[[ $taken -eq 10 ]] || fail "expected 10 commented keys to take in, found $taken"
listed=$(P11SHIM_CONFIG=$work/every-key.toml pkcs11-tool --module "$module" -L)
grep -qE "token label +: $label\$" <<<"$listed" || fail "every key: the token is not listed: $listed"
grep -q 'INFO: initialized over /usr/lib/softhsm/libsofthsm2.so' "$work/p11shim.log" || fail "every key: no log"

step "p11shim --help, and the man pages through man -l"
help=$("$cli" --help)
grep -q '^Usage: p11shim' <<<"$help" || fail "p11shim --help: $help"
! grep -q generate-docs <<<"$help" || fail "--help shows the hidden generate-docs"
for page in p11shim p11shim-mbk-create p11shim-backup; do
    file=$sysroot/usr/share/man/man1/$page.1.gz
    warnings=$(MANWIDTH=100 man --warnings -l "$file" 2>&1 >"$work/page.txt") || fail "man -l $file failed"
    [[ -z $warnings ]] || fail "man -l $file: $warnings"
    grep -q "^NAME" "$work/page.txt" || fail "man -l $file: no NAME section"
    grep -q "$page" "$work/page.txt" || fail "man -l $file: does not name $page"
done
grep -qE 'p11shim +mbk +create' <(MANWIDTH=100 man -l "$sysroot/usr/share/man/man1/p11shim-mbk-create.1.gz") ||
    fail "p11shim-mbk-create(1) does not show how the command is typed"

step "the bash completion loads and completes"
completions=$(bash --norc --noprofile -c '
    source "$1"
    complete -p p11shim >/dev/null || exit 1
    COMP_WORDS=(p11shim mb); COMP_CWORD=1; COMP_LINE="p11shim mb"; COMP_POINT=${#COMP_LINE}
    _p11shim p11shim mb p11shim
    echo "${COMPREPLY[*]}"
    COMP_WORDS=(p11shim ""); COMP_CWORD=1; COMP_LINE="p11shim "; COMP_POINT=${#COMP_LINE}
    _p11shim p11shim "" p11shim
    echo "${COMPREPLY[*]}"' bash "$sysroot/usr/share/bash-completion/completions/p11shim")
[[ $(head -n 1 <<<"$completions") == mbk ]] || fail "bash completion of 'p11shim mb': $completions"
tail -n 1 <<<"$completions" | grep -qw backup || fail "bash completion of 'p11shim ': $completions"
! grep -q generate-docs <<<"$completions" || fail "bash completion offers the hidden generate-docs"
if command -v zsh >/dev/null; then zsh -n "$sysroot/usr/share/zsh/vendor-completions/_p11shim"; fi
if command -v fish >/dev/null; then fish -n "$sysroot/usr/share/fish/vendor_completions.d/p11shim.fish"; fi

step "the p11-kit module file: disabled as shipped, enabled without its enable-in line"
# p11-kit reads a user's own module files (not root's), field by field over the system's: the shipped file
# as a user's, naming the installed module by its path, run as nobody.
home=$work/home
install -d -m 0755 "$home/.config/pkcs11/modules"
sed "s|^module: .*|module: $module|" "$sysroot/etc/pkcs11/modules/p11shim.module" \
    >"$home/.config/pkcs11/modules/p11shim.module"
chmod -R a+rX "$home" "$sysroot"
p11kit_says() {
    setpriv --reuid=nobody --regid=nogroup --clear-groups env -i HOME="$home" P11_KIT_DEBUG=lib \
        P11SHIM_MODULE=/nonexistent p11-kit list-modules 2>&1 | grep -E "module '?p11shim" || true
}
said=$(p11kit_says)
[[ $said == *"disabled module 'p11shim' running in 'p11-kit'"* && $said != *"loading module p11shim"* ]] ||
    fail "p11-kit does not see p11shim disabled: $said"
sed -i '/^enable-in:/d' "$home/.config/pkcs11/modules/p11shim.module"
said=$(p11kit_says)
[[ $said == *"loading module p11shim from path: $module"* ]] || fail "p11-kit does not load p11shim enabled: $said"

step "purge"
dpkg_said=$(dpkg --root="$sysroot" --purge p11shim-dbgsym p11shim 2>&1) || fail "dpkg --purge: $dpkg_said"
[[ ! -e $sysroot/etc/p11shim/p11shim.toml && ! -e $module && ! -e $sysroot/usr/lib/debug/.build-id ]] ||
    fail "purge left files behind"
echo "test-package: ok ($(basename "$deb"), $(du -k "$deb" | cut -f1) KiB)"
