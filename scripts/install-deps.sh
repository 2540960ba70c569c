#!/usr/bin/env bash
# Installs the system packages p11shim's demo and tests need, only those that are missing.
# Debian 12 (apt-get); run as root (or with sudo available). Rust/cargo must already be installed.
set -euo pipefail

# One package a line; later issues add theirs here (e.g. postgresql).
packages=(
    softhsm2                  # the test backend: /usr/lib/softhsm/libsofthsm2.so, softhsm2-util
    opensc                    # pkcs11-tool
    libengine-pkcs11-openssl  # OpenSSL engine "pkcs11" (libp11)
    openssl
    postgresql                # server binaries for the throwaway test cluster (scripts/pg-cluster.sh)
    libp11-kit-dev            # pkcs11.h for the C program that tests include/p11shim.h (tests/c_api.rs)
    libssl-dev                # OpenSSL headers: TLS to PostgreSQL (openssl-sys); tests/c_api.rs's C program (Ed25519)
    pkg-config                # how openssl-sys finds Debian's OpenSSL
    openjdk-17-jdk-headless   # keytool, jarsigner, jar: Java's SunPKCS11 provider in tests/dbtools_cases
    gnutls-bin                # p11tool (GnuTLS), listings in tests/dbtools_cases
    python3-pykcs11           # PyKCS11 for Debian's /usr/bin/python3, listings in tests/dbtools_cases
    nginx                     # TLS server with its key in a database slot (OpenSSL engine), tests/servers_cases
    curl                      # HTTPS client against that nginx, tests/servers_cases
    openssh-server            # sshd for logins with a key in a database slot, tests/servers_cases
    openssh-client            # ssh -I, ssh-agent -P, ssh-add -s, ssh-keygen -D, tests/servers_cases
    libcap2-bin               # setcap: a harness given a file capability (AT_SECURE) in tests/safe_loading.rs
    logrotate                 # logrotate -f with create and copytruncate against the shim's log, tests/files.rs
    dpkg-dev                  # dpkg-shlibdeps, dpkg-architecture: the Debian packages (scripts/package.sh)
    binutils                  # objcopy, strip, readelf: the packaged binaries stripped, their debug files
    man-db                    # man -l (with groff): the packaged man pages render (scripts/test-package.sh)
    p11-kit                   # p11-kit list-modules: the packaged p11-kit module file (scripts/test-package.sh)
)
# A C toolchain only when there is none (some crates build C code).
if ! command -v cc >/dev/null; then
    packages+=(build-essential pkg-config)
fi

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all present (${packages[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "install-deps: missing ${missing[*]} and apt-get is not available; install them by hand" >&2
    exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "install-deps: missing ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}
# A fresh machine has no package lists yet: update once, only if the first attempt fails.
if ! apt_install; then
    "${sudo[@]}" apt-get update -q
    apt_install
fi

for p in "${missing[@]}"; do
    if ! installed "$p"; then
        echo "install-deps: $p is still not installed" >&2
        exit 1
    fi
done
echo "install-deps: done"
