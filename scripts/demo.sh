#!/usr/bin/env bash
# p11shim demo: builds the shim, sets up a SoftHSM2 token in ./demo-work as a *database slot* (keys kept in
# an SQLite key store beside the config, wrapped under the token's MBK), and uses it *through the shim* with
# pkcs11-tool and the OpenSSL pkcs11 engine; every signature is verified with plain openssl (no HSM).
#
# Usage (from anywhere; as root on Debian 12, or with the packages of scripts/install-deps.sh installed):
#   bash scripts/demo.sh
# Every step prints a heading and ends with "OK"; the script stops with a non-zero status at the first failure.
set -Eeuo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

work=$root/demo-work
label=p11shim-demo
so_pin=demo-so-pin-4711
user_pin=demo-user-pin-0815
backend=/usr/lib/softhsm/libsofthsm2.so
# cargo builds into $CARGO_TARGET_DIR when set (relative to the repository root, where cargo runs).
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir=$root/$target_dir
shim=$target_dir/release/libp11shim.so
cli=$target_dir/release/p11shim

# --- output helpers ----------------------------------------------------------------------------------------
steps_done=()
current=""
started=$SECONDS
begin() {
    current=$1
    step_started=$SECONDS
    printf '\n==> %s\n' "$1"
}
ok() {
    local took=$((SECONDS - step_started))
    printf '    OK (%ss)\n' "$took"
    steps_done+=("$current (${took}s)")
}
indent() { sed 's/^/    /'; }
fail() {
    echo "    $*" >&2
    return 1
}
on_error() {
    local rc=$?
    # Subshells (pipelines, $(...)) inherit the trap: let only the main shell report.
    [[ $BASHPID == "$$" ]] || exit "$rc"
    echo >&2
    echo "FAILED: ${current:-before the first step} (exit status $rc)" >&2
    if [[ -s $work/p11shim.log ]]; then
        echo "last lines of $work/p11shim.log:" >&2
        tail -n 20 "$work/p11shim.log" | indent >&2
    fi
    exit "$rc"
}
trap on_error ERR

# pkcs11-tool through the shim, on the demo token.
p11() { pkcs11-tool --module "$shim" --token-label "$label" "$@"; }
p11_user() { p11 --login --pin "$user_pin" "$@"; }
# openssl with the pkcs11 engine loaded from our openssl.cnf (module = the shim).
openssl_engine() { OPENSSL_CONF=$work/openssl.cnf PKCS11_MODULE_PATH=$shim openssl "$@"; }
# A PKCS#11 URI for a private key on the demo token.
key_uri() { echo "pkcs11:token=$label;object=$1;type=private?pin-value=$user_pin"; }

# --- steps -------------------------------------------------------------------------------------------------
begin "Install missing system packages (scripts/install-deps.sh)"
bash "$root/scripts/install-deps.sh" | indent
ok

begin "Build the shim (cargo build --release)"
if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || fail "cargo not found: install Rust (https://rustup.rs) first"
build_log=$(mktemp)
if ! cargo build --release >"$build_log" 2>&1; then
    tail -n 40 "$build_log" | indent
    rm -f "$build_log"
    fail "cargo build --release failed"
fi
tail -n 1 "$build_log" | indent
rm -f "$build_log"
[[ -f $shim ]] || fail "$shim was not built"
[[ -x $cli ]] || fail "$cli was not built"
ok

begin "Create $work with a SoftHSM2 token '$label'"
rm -rf "$work"
mkdir -p "$work"
echo '*' >"$work/.gitignore" # keys, PINs in configs: never to be committed
exports=$(bash "$root/softhsm-config/setup-token.sh" "$work/softhsm" "$label" "$so_pin" "$user_pin" 2>"$work/setup-token.log") ||
    { indent <"$work/setup-token.log"; fail "softhsm-config/setup-token.sh failed"; }
indent <"$work/setup-token.log"
eval "$exports"
echo "SOFTHSM2_CONF=$SOFTHSM2_CONF" | indent
ok

begin "Write $work/p11shim.toml (backend: SoftHSM2; '$label' is a database slot; store: $work/keys.db)"
cat >"$work/p11shim.toml" <<EOF
# p11shim configuration for the demo; see README.md, "Configuration" and "Database slots".
module = "$backend"
# Relative paths are relative to this file.
log_file = "p11shim.log"
log_level = "debug"

[store]
url = "sqlite:keys.db"

[[slot]]
token = "$label"
storage = "database"
default_group = "Demo"
EOF
indent <"$work/p11shim.toml"
export P11SHIM_CONFIG=$work/p11shim.toml
unset P11SHIM_MODULE # would override `module`
ok

begin "Create the token's master backup key set (p11shim mbk create), show its fingerprint"
P11SHIM_SO_PIN=$so_pin P11SHIM_USER_PIN=$user_pin "$cli" mbk create --token "$label" | indent
"$cli" mbk show --token "$label" | indent
ok

begin "pkcs11-tool --show-info through the shim: manufacturer is p11shim"
p11 --show-info >"$work/show-info.txt"
indent <"$work/show-info.txt"
grep -Eq 'Manufacturer +p11shim' "$work/show-info.txt" || fail "manufacturer is not p11shim"
grep -Eq 'Library +p11shim/SoftHSM' "$work/show-info.txt" || fail "library description is not p11shim/SoftHSM..."
ok

begin "List slots and mechanisms through the shim (identical to the backend's)"
pkcs11-tool --module "$shim" --list-slots >"$work/slots.txt"
indent <"$work/slots.txt"
grep -q "token label *: *$label\$" "$work/slots.txt" || fail "token '$label' not listed"
pkcs11-tool --module "$backend" --list-slots >"$work/slots-direct.txt"
diff -u "$work/slots-direct.txt" "$work/slots.txt" | indent || fail "slot list differs from the backend's"
p11 --list-mechanisms >"$work/mechanisms.txt"
pkcs11-tool --module "$backend" --token-label "$label" --list-mechanisms >"$work/mechanisms-direct.txt"
diff -u "$work/mechanisms-direct.txt" "$work/mechanisms.txt" | indent || fail "mechanism list differs from the backend's"
echo "$(grep -c . "$work/mechanisms.txt") lines of mechanisms, identical to the backend's" | indent
ok

begin "Generate an EC P-256 key pair (label demo-ec, id 01)"
p11_user --keypairgen --key-type EC:prime256v1 --id 01 --label demo-ec | indent
ok

begin "Generate an RSA-2048 key pair (label demo-rsa, id 02)"
p11_user --keypairgen --key-type rsa:2048 --id 02 --label demo-rsa | indent
ok

begin "List the objects through the shim (the MBK set is the shim's and not listed)"
p11_user --list-objects 2>/dev/null | indent
p11_user --list-objects 2>/dev/null | grep -q "label: *demo-ec" || fail "demo-ec not listed"
if p11_user --list-objects 2>/dev/null | grep -q "p11shim-mbk"; then fail "the MBK set is listed"; fi
ok

begin "The keys live in the key store ($work/keys.db), not in the HSM token"
ls -l "$work/keys.db" | indent
[[ -s $work/keys.db ]] || fail "$work/keys.db is missing or empty"
pkcs11-tool --module "$backend" --token-label "$label" --login --pin "$user_pin" --list-objects 2>/dev/null \
    >"$work/objects-direct.txt"
echo "SoftHSM2's own token objects (directly, without the shim):" | indent
grep -E "Object|label" "$work/objects-direct.txt" | indent
if grep -q "demo-ec\|demo-rsa" "$work/objects-direct.txt"; then fail "a demo key is a token object in SoftHSM2"; fi
if grep -qa "PRIVATE KEY" "$work/keys.db"; then fail "clear key material in the store"; fi
ok

begin "Write $work/openssl.cnf: OpenSSL engine pkcs11 with MODULE_PATH = the shim"
engines_dir=$(openssl version -e | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p')
engine_so=${engines_dir:-/usr/lib/x86_64-linux-gnu/engines-3}/pkcs11.so
[[ -f $engine_so ]] || fail "$engine_so not found (package libengine-pkcs11-openssl)"
cat >"$work/openssl.cnf" <<EOF
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = $engine_so
MODULE_PATH = $shim
init = 1

[req]
distinguished_name = req_dn

[req_dn]
EOF
indent <"$work/openssl.cnf"
ok

begin "Export both public keys through the OpenSSL engine (PEM)"
# (pkcs11-tool 0.23's --read-object --type pubkey reads freed memory for EC keys and fails now and then.)
for key in ec rsa; do
    rm -f "$work/$key-pub.pem"
    openssl_engine pkey -engine pkcs11 -inform engine -pubin -pubout -out "$work/$key-pub.pem" \
        -in "pkcs11:token=$label;object=demo-$key;type=public" 2>&1 | grep -v "^Engine" | indent || true
    [[ -s $work/$key-pub.pem ]] || fail "the public key of demo-$key was not exported"
    openssl pkey -pubin -in "$work/$key-pub.pem" -noout -text | head -n 1 | indent
done
ok

begin "ECDSA: sign with pkcs11-tool, verify with plain openssl"
head -c 4096 /dev/urandom >"$work/data.bin"
# SoftHSM2 2.6.1 offers plain CKM_ECDSA (no ECDSA-SHA256): hash here, sign the digest in the token.
openssl dgst -sha256 -binary -out "$work/data.sha256" "$work/data.bin"
p11_user --sign --mechanism ECDSA --id 01 --signature-format openssl \
    --input-file "$work/data.sha256" --output-file "$work/data.ecdsa.sig" 2>&1 | indent
openssl dgst -sha256 -verify "$work/ec-pub.pem" -signature "$work/data.ecdsa.sig" "$work/data.bin" | indent
ok

begin "RSA: sign with the OpenSSL engine (SHA-256, PKCS#1 v1.5), verify with plain openssl"
openssl_engine dgst -engine pkcs11 -keyform engine -sign "$(key_uri demo-rsa)" -sha256 \
    -out "$work/data.rsa.sig" "$work/data.bin" 2>&1 | indent
openssl dgst -sha256 -verify "$work/rsa-pub.pem" -signature "$work/data.rsa.sig" "$work/data.bin" | indent
ok

begin "Self-signed certificate with the OpenSSL engine (RSA key), checked by openssl verify"
openssl_engine req -new -x509 -engine pkcs11 -keyform engine -key "$(key_uri demo-rsa)" \
    -subj "/CN=p11shim demo" -days 30 -sha256 -out "$work/demo-cert.pem" 2>&1 | indent
openssl x509 -in "$work/demo-cert.pem" -noout -subject -enddate | indent
openssl verify -CAfile "$work/demo-cert.pem" "$work/demo-cert.pem" | indent
# The certificate carries the token's public key.
cmp -s <(openssl x509 -in "$work/demo-cert.pem" -noout -pubkey) "$work/rsa-pub.pem" ||
    fail "certificate public key differs from the token's"
ok

begin "Users: an administrator (with the SO PIN) and an operator for group Demo"
export P11SHIM_PASSWORD_ADMIN=demo-admin-pass P11SHIM_PASSWORD_OPERATOR=demo-operator-pass
P11SHIM_SO_PIN=$so_pin P11SHIM_NEW_PASSWORD=$P11SHIM_PASSWORD_ADMIN \
    "$cli" user add admin --perm 10000000 --group-regex '.*' --password | indent
P11SHIM_NEW_PASSWORD=$P11SHIM_PASSWORD_OPERATOR \
    "$cli" user add operator --perm 00000002 --group-regex 'Demo' --password --logon admin | indent
"$cli" user list | indent
ok

begin "Back up group Demo under the MBK (p11shim backup), then verify the file completely"
P11SHIM_USER_PIN=$user_pin "$cli" backup --group Demo --out "$work/demo.p11b" --logon operator | indent
P11SHIM_USER_PIN=$user_pin "$cli" verify "$work/demo.p11b" --logon operator | indent
if grep -qa "PRIVATE KEY" "$work/demo.p11b"; then fail "clear key material in the backup"; fi
ok

begin "Lose the EC key (destroy it), restore it from the backup, sign again: the old public key verifies"
p11_user --delete-object --type privkey --id 01 2>/dev/null | indent
if p11_user --list-objects --type privkey 2>/dev/null | grep -q "demo-ec"; then fail "demo-ec still there"; fi
P11SHIM_USER_PIN=$user_pin "$cli" restore "$work/demo.p11b" --logon operator | indent
p11_user --sign --mechanism ECDSA --id 01 --signature-format openssl \
    --input-file "$work/data.sha256" --output-file "$work/data.ecdsa.restored.sig" 2>&1 | indent
openssl dgst -sha256 -verify "$work/ec-pub.pem" -signature "$work/data.ecdsa.restored.sig" "$work/data.bin" | indent
ok

begin "The audit log records it all, sealed by the HSM, and verifies"
"$cli" audit show | indent
"$cli" audit verify | indent
ok

begin "The shim's log ($work/p11shim.log) contains no PIN"
if [[ -f $work/p11shim.log ]]; then
    echo "$(wc -l <"$work/p11shim.log") lines" | indent
    if grep -qF -e "$user_pin" -e "$so_pin" -e demo-admin-pass -e demo-operator-pass "$work/p11shim.log"; then
        fail "a PIN appears in $work/p11shim.log"
    fi
else
    echo "(no log file written)" | indent
fi
ok

trap - ERR
printf '\nSummary: all %d steps OK in %ss\n' "${#steps_done[@]}" "$((SECONDS - started))"
for s in "${steps_done[@]}"; do
    echo "  OK  $s"
done
echo "Files: $work (token in softhsm/, p11shim.toml, keys.db, p11shim.log, openssl.cnf, keys, signatures, demo-cert.pem)"
echo "Try:   P11SHIM_CONFIG=$work/p11shim.toml SOFTHSM2_CONF=$SOFTHSM2_CONF pkcs11-tool --module $shim -L"
