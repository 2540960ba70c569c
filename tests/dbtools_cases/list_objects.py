"""Lists every object of one token as PyKCS11 (python3-pykcs11) sees it, one attribute a line.

Usage: python3 list_objects.py MODULE TOKEN_LABEL USER_PIN

Logs in as the user and prints one block per object: a line "object CLASS LABEL", then "  NAME: VALUE" for each
attribute below, in this order. Every attribute is read on its own (C_GetAttributeValue with one template
entry, size first), so a refusal shows as the CK_RV's name (CKR_ATTRIBUTE_TYPE_INVALID,
CKR_ATTRIBUTE_SENSITIVE, ...) in place of the value. Key material is never printed: the values of private and
secret keys, public points and moduli print as their length only. The objects come in the module's order; the
caller sorts the blocks.
"""

import sys

import PyKCS11
from PyKCS11.LowLevel import CKR_OK

BOOL, ULONG, TEXT, HEX, LENGTH, MECHS, CLASS, KEYTYPE, MECH, VALUE = range(10)

# (name, CKA_*, how to print). Numbers rather than PyKCS11's names: every one of them is in PKCS#11 2.40,
# whatever PyKCS11's version names.
ATTRIBUTES = [
    ("CKA_CLASS", 0x000, CLASS),
    ("CKA_KEY_TYPE", 0x100, KEYTYPE),
    ("CKA_LABEL", 0x003, TEXT),
    ("CKA_ID", 0x102, HEX),
    ("CKA_TOKEN", 0x001, BOOL),
    ("CKA_PRIVATE", 0x002, BOOL),
    ("CKA_MODIFIABLE", 0x170, BOOL),
    ("CKA_COPYABLE", 0x171, BOOL),
    ("CKA_DESTROYABLE", 0x172, BOOL),
    ("CKA_SENSITIVE", 0x103, BOOL),
    ("CKA_ALWAYS_SENSITIVE", 0x165, BOOL),
    ("CKA_EXTRACTABLE", 0x162, BOOL),
    ("CKA_NEVER_EXTRACTABLE", 0x164, BOOL),
    ("CKA_LOCAL", 0x163, BOOL),
    ("CKA_KEY_GEN_MECHANISM", 0x166, MECH),
    ("CKA_ENCRYPT", 0x104, BOOL),
    ("CKA_DECRYPT", 0x105, BOOL),
    ("CKA_WRAP", 0x106, BOOL),
    ("CKA_UNWRAP", 0x107, BOOL),
    ("CKA_SIGN", 0x108, BOOL),
    ("CKA_SIGN_RECOVER", 0x109, BOOL),
    ("CKA_VERIFY", 0x10A, BOOL),
    ("CKA_VERIFY_RECOVER", 0x10B, BOOL),
    ("CKA_DERIVE", 0x10C, BOOL),
    ("CKA_WRAP_WITH_TRUSTED", 0x210, BOOL),
    ("CKA_TRUSTED", 0x086, BOOL),
    ("CKA_ALWAYS_AUTHENTICATE", 0x202, BOOL),
    ("CKA_ALLOWED_MECHANISMS", 0x40000600, MECHS),
    ("CKA_VALUE_LEN", 0x161, ULONG),
    ("CKA_MODULUS_BITS", 0x121, ULONG),
    ("CKA_PUBLIC_EXPONENT", 0x122, HEX),
    ("CKA_MODULUS", 0x120, LENGTH),
    ("CKA_EC_PARAMS", 0x180, HEX),
    ("CKA_EC_POINT", 0x181, LENGTH),
    ("CKA_START_DATE", 0x110, HEX),
    ("CKA_END_DATE", 0x111, HEX),
    ("CKA_SUBJECT", 0x101, HEX),
    ("CKA_CERTIFICATE_TYPE", 0x080, ULONG),
    ("CKA_CERTIFICATE_CATEGORY", 0x087, ULONG),
    ("CKA_ISSUER", 0x081, HEX),
    ("CKA_SERIAL_NUMBER", 0x082, HEX),
    ("CKA_APPLICATION", 0x010, TEXT),
    ("CKA_OBJECT_ID", 0x012, HEX),
    ("CKA_VALUE", 0x011, VALUE),
]

CKO_PRIVATE_KEY, CKO_SECRET_KEY = 3, 4
UNAVAILABLE = 2**64 - 1  # CK_UNAVAILABLE_INFORMATION


def ulong(raw):
    if len(raw) != 8:
        return "<%d bytes, not a CK_ULONG>" % len(raw)
    return int.from_bytes(raw, "little")


def named(table, value, prefix):
    if value == UNAVAILABLE:
        return "CK_UNAVAILABLE_INFORMATION"
    name = table.get(value)
    return name if isinstance(name, str) else "%s 0x%x" % (prefix, value)


def show(kind, raw, klass):
    if kind == BOOL:
        return {b"\x00": "false", b"\x01": "true"}.get(raw, "<not a CK_BBOOL: %s>" % raw.hex())
    if kind in (ULONG, CLASS, KEYTYPE, MECH):
        n = ulong(raw)
        if isinstance(n, str):
            return n
        if kind == CLASS:
            return named(PyKCS11.CKO, n, "CKO")
        if kind == KEYTYPE:
            return named(PyKCS11.CKK, n, "CKK")
        if kind == MECH:
            return named(PyKCS11.CKM, n, "CKM")
        return str(n)
    if kind == TEXT:
        return repr(raw.decode("utf-8", "replace"))
    if kind == HEX:
        return raw.hex() or "<empty>"
    if kind == LENGTH:
        return "<%d bytes>" % len(raw)
    if kind == MECHS:
        if len(raw) % 8:
            return "<%d bytes, not a CK_MECHANISM_TYPE array>" % len(raw)
        mechs = [ulong(raw[i : i + 8]) for i in range(0, len(raw), 8)]
        return "[" + ", ".join(named(PyKCS11.CKM, m, "CKM") for m in mechs) + "]"
    # CKA_VALUE: key material only as its length; certificates and data in full.
    if klass in (CKO_PRIVATE_KEY, CKO_SECRET_KEY):
        return "<%d bytes>" % len(raw)
    return raw.hex() or "<empty>"


def attribute(session, obj, kind, cka, klass):
    template = PyKCS11.LowLevel.ckattrlist(1)
    template[0].Reset()
    template[0].SetType(cka)
    # First call: the size (PyKCS11 then reserves the buffer); second: the value.
    for _ in range(2):
        rv = session.lib.C_GetAttributeValue(session.session, obj, template)
        if rv != CKR_OK:
            return PyKCS11.CKR.get(rv, "CKR 0x%x" % rv)
    return show(kind, bytes(template[0].GetBin()), klass)


def main():
    module, label, pin = sys.argv[1:4]
    lib = PyKCS11.PyKCS11Lib()
    lib.load(module)
    slots = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == label]
    if len(slots) != 1:
        sys.exit("token %r: %d slots" % (label, len(slots)))
    session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    session.login(pin)
    objects = session.findObjects()
    for obj in objects:
        klass = None
        values = {}
        for name, cka, kind in ATTRIBUTES:
            values[name] = attribute(session, obj, kind, cka, klass)
            if cka == 0x000 and not values[name].startswith("CKR"):
                klass = getattr(PyKCS11, values[name], None)
        print("object %s %s" % (values["CKA_CLASS"], values["CKA_LABEL"]))
        for name, _, _ in ATTRIBUTES:
            print("  %s: %s" % (name, values[name]))
    session.logout()
    session.closeSession()


if __name__ == "__main__":
    main()
