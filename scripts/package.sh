#!/usr/bin/env bash
# Builds the Debian packages of p11shim from the release build, with dpkg-deb from a staged tree (no
# debian/ source package, no cargo-deb):
#   OUTDIR/p11shim_VERSION_ARCH.deb          the module, the command, man pages, completions, configuration
#   OUTDIR/p11shim-dbgsym_VERSION_ARCH.deb   the debug information of both, by build ID
# VERSION is the package's version in Cargo.toml; packaging/changelog must start with the same version.
# The binaries are stripped copies: target/release/ keeps its symbols (the benchmarks and `cargo build
# --release` users see no difference).
#
# Usage: bash scripts/package.sh [OUTDIR]     (default: target/debian; needs dpkg-dev and binutils)
# Prints the paths of the two packages on stdout, progress on stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi
for tool in cargo dpkg-deb dpkg-shlibdeps objcopy readelf strip gzip; do
    if ! command -v "$tool" >/dev/null; then
        echo "package.sh: $tool not found (apt-get install dpkg-dev binutils; Rust for cargo)" >&2
        exit 1
    fi
done

target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir=$root/$target_dir
out=${1:-$target_dir/debian}
mkdir -p "$out"
out=$(cd "$out" && pwd)

maintainer="Seed 7b4ae1fa maintainers <maintainers@users.noreply.b-seed-7b4ae1fa.example>"
version=$(sed -n '/^\[package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' Cargo.toml)
changelog_version=$(sed -n '1 s/^p11shim (\([^)]*\)).*/\1/p' packaging/changelog)
if [[ -z $version || $version != "$changelog_version" ]]; then
    echo "package.sh: Cargo.toml says version '$version', packaging/changelog '$changelog_version':" \
        "add a changelog entry for $version" >&2
    exit 1
fi
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
# The whole workspace, as scripts/test.sh builds it: `-p p11shim` alone unifies the dependencies' features
# differently and would rebuild them (and test.sh's next build would rebuild them again).
echo "package.sh: cargo build --release --workspace (p11shim $version, $arch, $multiarch)" >&2
cargo build --release --workspace --quiet
# Every file of the packages carries the changelog's date: the same sources give the same packages. Set after
# the build: build scripts that watch SOURCE_DATE_EPOCH would rebuild their crates whenever it changes.
SOURCE_DATE_EPOCH=$(date -d "$(sed -n 's/^ -- .*>  //p' packaging/changelog | head -n 1)" +%s)
export SOURCE_DATE_EPOCH
module=$target_dir/release/libp11shim.so
cli=$target_dir/release/p11shim

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/p11shim
dbg=$stage/p11shim-dbgsym
doc=$pkg/usr/share/doc/p11shim
install -d -m 0755 "$pkg/DEBIAN" "$dbg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/lib/$multiarch/pkcs11" \
    "$pkg/usr/share/man/man1" "$pkg/usr/share/bash-completion/completions" \
    "$pkg/usr/share/zsh/vendor-completions" "$pkg/usr/share/fish/vendor_completions.d" \
    "$pkg/etc/p11shim" "$pkg/etc/pkcs11/modules" "$doc" "$dbg/usr/share/doc"
install -d -m 0750 "$pkg/var/lib/p11shim"

# strip_into SRC DEST OPTION: DEST is SRC stripped (OPTION: --strip-unneeded for a shared object, whose
# dynamic symbols stay; --strip-all for an executable); SRC's debug information goes, compressed, to the
# debug package under its build ID, and DEST names that file in .gnu_debuglink. Prints the build ID.
strip_into() {
    local src=$1 dest=$2 how=$3 id debug
    id=$(readelf -n "$src" | sed -n 's/^ *Build ID: *\([0-9a-f]*\)$/\1/p')
    if [[ ${#id} -lt 4 ]]; then
        echo "package.sh: $src has no build ID (the linker's --build-id)" >&2
        return 1
    fi
    debug=$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
    install -d -m 0755 "$(dirname "$debug")"
    objcopy --only-keep-debug --compress-debug-sections "$src" "$debug"
    chmod 0644 "$debug"
    strip "$how" --remove-section=.comment --remove-section=.note -o "$dest" "$src"
    objcopy --add-gnu-debuglink="$debug" "$dest"
    chmod 0755 "$dest"
    echo "$id"
}
build_ids=()
build_ids+=("$(strip_into "$module" "$pkg/usr/lib/$multiarch/pkcs11/p11shim.so" --strip-unneeded)")
build_ids+=("$(strip_into "$cli" "$pkg/usr/bin/p11shim" --strip-all)")

# Man pages and completions, from the command's own clap definition.
generated=$stage/generated
"$cli" generate-docs "$generated"
for page in "$generated"/man/*.1; do
    name=$(basename "$page")
    gzip -9n <"$page" >"$pkg/usr/share/man/man1/$name.gz"
done
install -m 0644 "$generated/completions/p11shim.bash" "$pkg/usr/share/bash-completion/completions/p11shim"
install -m 0644 "$generated/completions/_p11shim" "$pkg/usr/share/zsh/vendor-completions/_p11shim"
install -m 0644 "$generated/completions/p11shim.fish" "$pkg/usr/share/fish/vendor_completions.d/p11shim.fish"
chmod 0644 "$pkg"/usr/share/man/man1/*

# Configuration: both are conffiles, readable by every application that loads the module (see the files).
install -m 0644 packaging/p11shim.toml "$pkg/etc/p11shim/p11shim.toml"
install -m 0644 packaging/p11shim.module "$pkg/etc/pkcs11/modules/p11shim.module"
conffiles=(/etc/p11shim/p11shim.toml /etc/pkcs11/modules/p11shim.module)

# Documentation.
crates=$(cargo tree -e normal -p p11shim --target "$(rustc -vV | sed -n 's/^host: //p')" --prefix none \
    --format '{p}: {l}' | grep -v -e '(proc-macro)' -e '^p11shim ' | sed 's/ (\*)$//; s/^/ /' | sort -u)
awk -v crates="$crates" '/@CRATES@/ { print crates; next } { print }' packaging/copyright >"$doc/copyright"
# A native package (its version has no Debian revision): the changelog is changelog.gz, not changelog.Debian.gz.
gzip -9n <packaging/changelog >"$doc/changelog.gz"
gzip -9n <README.md >"$doc/README.md.gz"
sed "s|@MULTIARCH@|$multiarch|g" packaging/README.Debian >"$doc/README.Debian"
chmod 0644 "$doc"/*
# /var/lib/p11shim is 0750 on purpose (wrapped keys and the audit log of database slots).
install -d -m 0755 "$pkg/usr/share/lintian/overrides"
printf '%s\n' "p11shim: non-standard-dir-perm 0750 != 0755 [var/lib/p11shim/]" \
    >"$pkg/usr/share/lintian/overrides/p11shim"
chmod 0644 "$pkg/usr/share/lintian/overrides/p11shim"
ln -s p11shim "$dbg/usr/share/doc/p11shim-dbgsym"

# Dependencies of the two ELF files, from the shared libraries they use (dpkg-shlibdeps wants a
# debian/control to stand in).
install -d "$stage/src/debian"
printf 'Source: p11shim\n\nPackage: p11shim\nArchitecture: any\n' >"$stage/src/debian/control"
depends=$(cd "$stage/src" && dpkg-shlibdeps -O -e"$pkg/usr/lib/$multiarch/pkcs11/p11shim.so" \
    -e"$pkg/usr/bin/p11shim" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
if [[ -z $depends ]]; then
    echo "package.sh: dpkg-shlibdeps found no dependencies" >&2
    exit 1
fi

installed_size() { du -sk --exclude=DEBIAN "$1" | cut -f1; }

cat >"$pkg/DEBIAN/control" <<EOF
Package: p11shim
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(installed_size "$pkg")
Depends: $depends
Suggests: softhsm2, opensc, p11-kit
Section: admin
Priority: optional
Description: PKCS#11 module in front of an HSM's module, with key groups and backups
 p11shim is a PKCS#11 module that applications load in place of their HSM
 vendor's library. It loads the real module and forwards every call to it, so
 applications see the same slots, tokens, keys and return codes as before.
 .
 A slot can be made a database slot: every token key an application creates
 there is kept in an RDBMS (SQLite, or PostgreSQL shared by several hosts),
 wrapped under the HSM's master backup key, with a group. The p11shim command
 backs up, restores and verifies keys one group at a time under that key, with
 users, permission masks and a sealed audit log.
 .
 The module is /usr/lib/$multiarch/pkcs11/p11shim.so; its p11-kit
 registration is shipped disabled.
EOF
printf '%s\n' "${conffiles[@]}" >"$pkg/DEBIAN/conffiles"

cat >"$dbg/DEBIAN/control" <<EOF
Package: p11shim-dbgsym
Source: p11shim
Version: $version
Auto-Built-Package: debug-symbols
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(installed_size "$dbg")
Depends: p11shim (= $version)
Section: debug
Priority: optional
Description: debug symbols for p11shim
Build-Ids: ${build_ids[*]}
EOF

# md5sums of every file but the conffiles (dpkg keeps theirs itself); paths relative to the root.
md5sums() {
    local dir=$1
    (cd "$dir" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort |
        grep -v -x -F -f <(printf '%s\n' "${conffiles[@]#/}") | xargs -r -d '\n' md5sum) >"$dir/DEBIAN/md5sums"
}
md5sums "$pkg"
md5sums "$dbg"
chmod 0644 "$pkg"/DEBIAN/* "$dbg"/DEBIAN/*

find "$pkg" "$dbg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
deb=$out/p11shim_${version}_$arch.deb
dbgsym=$out/p11shim-dbgsym_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2
# The debug sections are zlib-compressed already: xz would take 15 s to save half a percent.
dpkg-deb --root-owner-group -Zgzip --build "$dbg" "$dbgsym" >&2
echo "$deb"
echo "$dbgsym"
