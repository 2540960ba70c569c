/*
 * p11shim.h: what p11shim adds to the PKCS#11 API, for C applications.
 *
 * Include it after your PKCS#11 header (pkcs11.h / cryptoki.h). The shim exports only C_GetFunctionList,
 * C_GetInterfaceList and C_GetInterface; everything else is reached through the function tables.
 */
#ifndef P11SHIM_H
#define P11SHIM_H

/* The shim's version, as C_GetInfo reports it in libraryVersion. */
#define P11SHIM_VERSION_MAJOR 0
#define P11SHIM_VERSION_MINOR 1

/* The manufacturerID C_GetInfo reports (blank-padded to 32 bytes there). The libraryDescription is
 * "p11shim/<backend manufacturerID>". */
#define P11SHIM_MANUFACTURER "p11shim"

/*
 * Object handles with this bit set belong to the shim: keys it keeps outside the HSM (key store), and
 * aliases for backend handles that happen to use this bit, so that the two ranges never collide. Handles
 * of ordinary backend objects are passed through unchanged. Applications need not care: every handle the
 * shim returns is valid in every call that takes an object handle.
 */
#define P11SHIM_HANDLE_BIT (((CK_ULONG)1) << (sizeof(CK_ULONG) * 8 - 1))

#endif /* P11SHIM_H */
