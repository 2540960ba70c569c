/*
 * A C application that uses p11shim the way servers do: it loads the module with dlopen, forks workers, unloads
 * and reloads it, and sits idle for long stretches. tests/process_cases/mod.rs builds it with `cc` and runs
 * one mode per process; the Rust side judges the output and the exit status.
 *
 * usage: harness MODE SHIM TOKEN PIN [ARGS...]
 *   init    SHIM TOKEN SO_PIN USER_PIN NKEYS   C_InitToken (the shim makes the MBK set), the user PIN, and NKEYS
 *                                              stored EC P-256 key pairs labelled key0.. (each signs once)
 *   storm   SHIM TOKEN PIN NKEYS FULL BATCH DEADLINE_S BUDGET_S
 *                                              see mode_storm() below; prints one STORM line of counts
 *   writer  SHIM TOKEN PIN STOPFILE MAX_S      creates, uses and destroys stored keys until STOPFILE exists
 *   verify  SHIM TOKEN PIN NKEYS               every key0.. signs and its public key verifies
 *   unload  SHIM TOKEN PIN a|b|c|d main|thread see mode_unload() below
 *   threads SHIM TOKEN PIN ROUNDS              no "p11shim-*" thread is alive once C_Finalize has returned
 *   idle    SHIM TOKEN PIN WINDOW_S            see mode_idle() below
 *   destroy SHIM TOKEN PIN LABEL               destroys the private key LABEL (another process's change)
 *   spin    SECONDS                            burns one core (load for the other modes), then exits
 *
 * Every failing step prints "FAIL <step>: <CK_RV>" on stderr and exits with that step's own code (see enum
 * step), so a failure names the call that failed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

/* Exit codes: one per step, so that a forked child's status says where it failed. */
enum step {
    ST_NONE = 0,
    ST_LOAD = 9,
    ST_INIT = 10,
    ST_SLOT = 11,
    ST_OPEN = 12,
    ST_LOGIN = 13,
    ST_FIND = 14,
    ST_SIGNINIT = 15,
    ST_SIGN = 16,
    ST_FINALIZE = 17,
    ST_VERIFY = 18,
    ST_DESTROY = 19,
    ST_GENERATE = 20,
    ST_ENCRYPT = 21,
    ST_DLCLOSE = 22,
    ST_INITTOKEN = 23,
    ST_INITPIN = 24,
    ST_LOGOUT = 25,
    ST_THREADS = 41,
    ST_USAGE = 64,
};

static const char *step_name(int step) {
    switch (step) {
    case ST_NONE: return "none";
    case ST_LOAD: return "dlopen";
    case ST_INIT: return "C_Initialize";
    case ST_SLOT: return "C_GetSlotList";
    case ST_OPEN: return "C_OpenSession";
    case ST_LOGIN: return "C_Login";
    case ST_FIND: return "C_FindObjects";
    case ST_SIGNINIT: return "C_SignInit";
    case ST_SIGN: return "C_Sign";
    case ST_FINALIZE: return "C_Finalize";
    case ST_VERIFY: return "C_Verify";
    case ST_DESTROY: return "C_DestroyObject";
    case ST_GENERATE: return "C_GenerateKey";
    case ST_ENCRYPT: return "C_Encrypt";
    case ST_DLCLOSE: return "dlclose";
    case ST_INITTOKEN: return "C_InitToken";
    case ST_INITPIN: return "C_InitPIN";
    case ST_LOGOUT: return "C_Logout";
    case ST_THREADS: return "threads alive after C_Finalize";
    case 100: return "exit()";
    case 101: return "_exit()";
    default: return "?";
    }
}

static void *lib;
static CK_FUNCTION_LIST_PTR p11;
/* Where a forked child is: the parent reads it when the child hangs (shared memory, one int per child). */
static volatile int *progress;

static void at(int step) {
    if (progress)
        *progress = step;
}

static void fail(int step, CK_RV rv) {
    fprintf(stderr, "FAIL %s: CK_RV 0x%lx (pid %d)\n", step_name(step), (unsigned long)rv, (int)getpid());
    fflush(stderr);
    _exit(step);
}

#define CALL(step, expr)                                                                                   \
    do {                                                                                                   \
        at(step);                                                                                          \
        CK_RV r_ = (expr);                                                                                 \
        if (r_ != CKR_OK)                                                                                  \
            fail(step, r_);                                                                                \
    } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
}

static void load(const char *path) {
    at(ST_LOAD);
    lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "FAIL dlopen %s: %s\n", path, dlerror());
        _exit(ST_LOAD);
    }
    CK_RV (*get_list)(CK_FUNCTION_LIST_PTR_PTR) = (CK_RV(*)(CK_FUNCTION_LIST_PTR_PTR))dlsym(lib, "C_GetFunctionList");
    if (!get_list) {
        fprintf(stderr, "FAIL dlsym C_GetFunctionList: %s\n", dlerror());
        _exit(ST_LOAD);
    }
    CALL(ST_LOAD, get_list(&p11));
}

static void unload(void) {
    at(ST_DLCLOSE);
    if (dlclose(lib) != 0) {
        fprintf(stderr, "FAIL dlclose: %s\n", dlerror());
        _exit(ST_DLCLOSE);
    }
    lib = NULL;
    p11 = NULL;
}

static void initialize(void) {
    CK_C_INITIALIZE_ARGS args;
    memset(&args, 0, sizeof args);
    args.flags = CKF_OS_LOCKING_OK;
    CALL(ST_INIT, p11->C_Initialize(&args));
}

static void finalize(void) {
    CALL(ST_FINALIZE, p11->C_Finalize(NULL));
}

static int label_is(const unsigned char padded[32], const char *label) {
    size_t n = strlen(label);
    if (n > 32 || memcmp(padded, label, n) != 0)
        return 0;
    for (size_t i = n; i < 32; i++)
        if (padded[i] != ' ')
            return 0;
    return 1;
}

static CK_SLOT_ID token_slot(const char *label) {
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64;
    CALL(ST_SLOT, p11->C_GetSlotList(CK_TRUE, slots, &n));
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) == CKR_OK && label_is(info.label, label))
            return slots[i];
    }
    fprintf(stderr, "FAIL no token labelled %s\n", label);
    _exit(ST_SLOT);
}

static CK_SESSION_HANDLE user_session(const char *token, const char *pin) {
    CK_SLOT_ID slot = token_slot(token);
    CK_SESSION_HANDLE s;
    CALL(ST_OPEN, p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s));
    CK_RV rv = p11->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    at(ST_LOGIN);
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
        fail(ST_LOGIN, rv);
    return s;
}

static CK_OBJECT_HANDLE find(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls, const char *label) {
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE h[2];
    CK_ULONG n = 0;
    CALL(ST_FIND, p11->C_FindObjectsInit(s, t, 2));
    CALL(ST_FIND, p11->C_FindObjects(s, h, 2, &n));
    CALL(ST_FIND, p11->C_FindObjectsFinal(s));
    if (n != 1) {
        fprintf(stderr, "FAIL C_FindObjects: %lu objects labelled %s (pid %d)\n", (unsigned long)n, label,
                (int)getpid());
        _exit(ST_FIND);
    }
    return h[0];
}

static const CK_BYTE DIGEST[32] = "p11shim process test digest 32B";

/* ECDSA over DIGEST; returns the CK_RV of the first call that failed (for uses that may fail on purpose). */
static CK_RV try_sign(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, CK_BYTE sig[64]) {
    CK_MECHANISM ecdsa = {CKM_ECDSA, NULL, 0};
    CK_ULONG len = 64;
    at(ST_SIGNINIT);
    CK_RV rv = p11->C_SignInit(s, &ecdsa, key);
    if (rv != CKR_OK)
        return rv;
    at(ST_SIGN);
    rv = p11->C_Sign(s, (CK_BYTE_PTR)DIGEST, sizeof DIGEST, sig, &len);
    if (rv == CKR_OK && len != 64) {
        fprintf(stderr, "FAIL C_Sign: a %lu-byte signature\n", (unsigned long)len);
        _exit(ST_SIGN);
    }
    return rv;
}

static void sign(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, CK_BYTE sig[64]) {
    CK_RV rv = try_sign(s, key, sig);
    if (rv != CKR_OK)
        fail(progress ? *progress : ST_SIGN, rv);
}

static void verify(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE pub, CK_BYTE sig[64]) {
    CK_MECHANISM ecdsa = {CKM_ECDSA, NULL, 0};
    CALL(ST_VERIFY, p11->C_VerifyInit(s, &ecdsa, pub));
    CALL(ST_VERIFY, p11->C_Verify(s, (CK_BYTE_PTR)DIGEST, sizeof DIGEST, sig, 64));
}

/* Sign with the private key `label`, using the handle a find gives. */
static void sign_with(CK_SESSION_HANDLE s, const char *label) {
    CK_BYTE sig[64];
    sign(s, find(s, CKO_PRIVATE_KEY, label), sig);
}

/* ---- the shim's threads, from /proc/self/task ---- */

/* Whether thread `tid` is still running code: not a zombie, not dead, not inside exit(2). A thread that was
 * joined can still be listed for a moment: the kernel wakes the joiner before it removes the thread. */
static int task_alive(const char *tid) {
    char path[320], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%s/stat", tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *close = strrchr(buf, ')');
    if (!close || close[1] == 0)
        return 0;
    char state = close[2];
    if (state == 'Z' || state == 'X' || state == 'x')
        return 0;
    snprintf(path, sizeof path, "/proc/self/task/%s/syscall", tid);
    f = fopen(path, "r");
    if (!f)
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    long nr = strtol(buf, NULL, 10);
    if (strncmp(buf, "running", 7) == 0)
        return 2; /* on a CPU right now: look again */
    return nr != 60 && nr != 231; /* exit, exit_group */
}

/* Writes the names of this process's live "p11shim*" threads into `out`; returns how many. */
static int shim_threads(char *out, size_t size) {
    int count = 0;
    out[0] = 0;
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[320], name[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (!fgets(name, sizeof name, f))
            name[0] = 0;
        fclose(f);
        name[strcspn(name, "\n")] = 0;
        if (strncmp(name, "p11shim", 7) != 0)
            continue;
        int alive = task_alive(e->d_name);
        for (int i = 0; alive == 2 && i < 20; i++) {
            pause_ms(1);
            alive = task_alive(e->d_name);
        }
        if (!alive)
            continue;
        count++;
        size_t used = strlen(out);
        snprintf(out + used, size - used, "%s%s(tid %s)", used ? " " : "", name, e->d_name);
    }
    closedir(d);
    return count;
}

/* ---- modes ---- */

static int mode_init(const char *token, const char *so_pin, const char *user_pin, int nkeys) {
    initialize();
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64;
    CALL(ST_SLOT, p11->C_GetSlotList(CK_TRUE, slots, &n));
    CK_SLOT_ID empty = (CK_SLOT_ID)-1;
    for (CK_ULONG i = 0; i < n && empty == (CK_SLOT_ID)-1; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) == CKR_OK && !(info.flags & CKF_TOKEN_INITIALIZED))
            empty = slots[i];
    }
    if (empty == (CK_SLOT_ID)-1) {
        fprintf(stderr, "FAIL no slot with an uninitialized token\n");
        return ST_SLOT;
    }
    CK_UTF8CHAR padded[32];
    memset(padded, ' ', 32);
    memcpy(padded, token, strlen(token));
    CALL(ST_INITTOKEN, p11->C_InitToken(empty, (CK_UTF8CHAR_PTR)so_pin, strlen(so_pin), padded));
    CK_SESSION_HANDLE s;
    CALL(ST_OPEN, p11->C_OpenSession(token_slot(token), CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s));
    CALL(ST_LOGIN, p11->C_Login(s, CKU_SO, (CK_UTF8CHAR_PTR)so_pin, strlen(so_pin)));
    CALL(ST_INITPIN, p11->C_InitPIN(s, (CK_UTF8CHAR_PTR)user_pin, strlen(user_pin)));
    CALL(ST_LOGOUT, p11->C_Logout(s));
    CALL(ST_LOGIN, p11->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)user_pin, strlen(user_pin)));
    static CK_BYTE p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    CK_BBOOL yes = CK_TRUE;
    for (int i = 0; i < nkeys; i++) {
        char label[16];
        snprintf(label, sizeof label, "key%d", i);
        CK_ATTRIBUTE pub[] = {{CKA_TOKEN, &yes, 1},
                              {CKA_EC_PARAMS, p256, sizeof p256},
                              {CKA_VERIFY, &yes, 1},
                              {CKA_LABEL, label, strlen(label)}};
        CK_ATTRIBUTE priv[] = {{CKA_TOKEN, &yes, 1},
                               {CKA_SIGN, &yes, 1},
                               {CKA_SENSITIVE, &yes, 1},
                               {CKA_PRIVATE, &yes, 1},
                               {CKA_LABEL, label, strlen(label)}};
        CK_MECHANISM gen = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
        CK_OBJECT_HANDLE hpub, hpriv;
        CALL(ST_GENERATE, p11->C_GenerateKeyPair(s, &gen, pub, 4, priv, 5, &hpub, &hpriv));
        if (!(hpriv >> 63)) {
            fprintf(stderr, "FAIL %s is not a stored key (handle 0x%lx)\n", label, (unsigned long)hpriv);
            return ST_GENERATE;
        }
        CK_BYTE sig[64];
        sign(s, hpriv, sig);
        verify(s, hpub, sig);
    }
    finalize();
    printf("INIT token=%s keys=%d\n", token, nkeys);
    return 0;
}

/* A forked worker: the calls an nginx worker makes with its parent's module, each step its own exit code. */
/* No object of the shim's is visible: the HSM copies of stored keys carry no label, and every private key of
 * these tests has one. (SoftHSM2 keeps its state across fork: the parent's copies are still in the child's
 * backend, and the shim must go on hiding them.) */
static void no_unlabelled_private_key(CK_SESSION_HANDLE s) {
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, "", 0}};
    CK_OBJECT_HANDLE h[4];
    CK_ULONG n = 0;
    CALL(ST_FIND, p11->C_FindObjectsInit(s, t, 2));
    CALL(ST_FIND, p11->C_FindObjects(s, h, 4, &n));
    CALL(ST_FIND, p11->C_FindObjectsFinal(s));
    if (n != 0) {
        fprintf(stderr, "FAIL C_FindObjects: %lu private keys without a label, the shim's own (pid %d)\n",
                (unsigned long)n, (int)getpid());
        _exit(ST_FIND);
    }
}

static void storm_child(const char *token, const char *pin, const char *label) {
    /* The child has its parent's configuration without being told: P11SHIM_CONFIG is gone from its
     * environment, as when the parent read its configuration from a file it was given another way. */
    unsetenv("P11SHIM_CONFIG");
    initialize();
    CK_SESSION_HANDLE s = user_session(token, pin);
    no_unlabelled_private_key(s);
    sign_with(s, label);
    finalize();
    at(ST_NONE);
    _exit(0);
}

/* What a hung child waits for: each thread's kernel wait channel and, for the first one (`backtrace`), the
 * threads' stacks when gdb is there. */
static void describe_hang(pid_t pid, int backtrace) {
    char path[320];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char comm[64] = "?", wchan[64] = "?";
        snprintf(path, sizeof path, "/proc/%d/task/%s/comm", (int)pid, e->d_name);
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(comm, sizeof comm, f))
                comm[0] = 0;
            fclose(f);
        }
        snprintf(path, sizeof path, "/proc/%d/task/%s/wchan", (int)pid, e->d_name);
        f = fopen(path, "r");
        if (f) {
            if (!fgets(wchan, sizeof wchan, f))
                wchan[0] = 0;
            fclose(f);
        }
        comm[strcspn(comm, "\n")] = 0;
        fprintf(stderr, "  hung child %d thread %s %s waits in %s\n", (int)pid, e->d_name, comm, wchan);
    }
    closedir(d);
    if (backtrace && access("/usr/bin/gdb", X_OK) == 0) {
        char cmd[256];
        snprintf(cmd, sizeof cmd,
                 "timeout 60 gdb -p %d -batch -nx -ex 'thread apply all bt 25' 2>/dev/null | grep -E '^(#|Thread)' >&2",
                 (int)pid);
        if (system(cmd) != 0)
            fprintf(stderr, "  (no backtrace)\n");
    }
}

/*
 * The parent loads the shim, initializes, logs in and signs with a stored key (the store is open and its
 * threads run), then forks FULL workers in batches of BATCH, each batch joined by two children that never
 * call C_Initialize and end with exit(0) and with _exit(0). Each child has DEADLINE_S seconds; the parent then
 * kills it and counts it as hung (naming the step it hung in). Between batches the parent signs again. The
 * storm stops early after three batches with a hang, or when BUDGET_S is spent: a broken module must make
 * a failing test, not a stuck one.
 */
static int mode_storm(const char *token, const char *pin, int nkeys, int full, int batch, int deadline, int budget) {
    progress = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (progress == MAP_FAILED) {
        perror("mmap");
        return ST_USAGE;
    }
    volatile int *slots = progress;
    progress = NULL; /* the parent's own steps are not recorded there */
    initialize();
    CK_SESSION_HANDLE s = user_session(token, pin);
    CK_OBJECT_HANDLE key = find(s, CKO_PRIVATE_KEY, "key0");
    CK_BYTE sig[64];
    sign(s, key, sig);
    printf("PARENT-READY\n");
    fflush(stdout);
    fflush(stderr);

    int forked = 0, started_full = 0, bare_exit = 0, bare__exit = 0, ok = 0, hung = 0, crashed = 0, failed = 0;
    int parent_failed = 0, hung_batches = 0, stopped_early = 0;
    int failed_at[128] = {0}, hung_at[128] = {0}, signals[65] = {0}, described = 0;
    double began = now();
    while (started_full < full) {
        if (hung_batches >= 3 || now() - began > budget) {
            stopped_early = 1;
            break;
        }
        int n = batch + 2;
        pid_t pids[64];
        int kinds[64]; /* 0: a worker, 100: exit(), 101: _exit() */
        for (int j = 0; j < n; j++) {
            kinds[j] = j == batch ? 100 : j == batch + 1 ? 101 : 0;
            slots[j] = ST_NONE;
            char label[16];
            snprintf(label, sizeof label, "key%d", (started_full + j) % nkeys);
            pid_t pid = fork();
            if (pid < 0) {
                perror("fork");
                return ST_USAGE;
            }
            if (pid == 0) {
                /* A child outlives neither the parent nor its deadline: should the parent be killed, so is it. */
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                progress = &slots[j];
                if (kinds[j] == 100) {
                    at(100);
                    exit(0);
                }
                if (kinds[j] == 101) {
                    at(101);
                    _exit(0);
                }
                storm_child(token, pin, label);
            }
            pids[j] = pid;
            forked++;
        }
        started_full += batch;
        bare_exit++;
        bare__exit++;
        double until = now() + deadline;
        int left = n, batch_hung = 0;
        while (left > 0) {
            for (int j = 0; j < n; j++) {
                if (pids[j] <= 0)
                    continue;
                int status;
                pid_t r = waitpid(pids[j], &status, WNOHANG);
                if (r == 0 && now() < until)
                    continue;
                if (r == 0) {
                    int where = slots[j];
                    fprintf(stderr, "HUNG child %d (%s) in %s after %d s: killed\n", (int)pids[j],
                            kinds[j] ? step_name(kinds[j]) : "worker", step_name(where), deadline);
                    if (described < 2)
                        describe_hang(pids[j], described == 0);
                    described++;
                    kill(pids[j], SIGKILL);
                    waitpid(pids[j], &status, 0);
                    hung++;
                    batch_hung = 1;
                    hung_at[where & 127]++;
                } else if (WIFSIGNALED(status)) {
                    int sig_no = WTERMSIG(status);
                    fprintf(stderr, "CRASH child %d (%s) killed by signal %d in %s\n", (int)pids[j],
                            kinds[j] ? step_name(kinds[j]) : "worker", sig_no, step_name(slots[j]));
                    crashed++;
                    signals[sig_no & 63]++;
                } else if (WEXITSTATUS(status) != 0) {
                    fprintf(stderr, "FAILED child %d (%s) exit status %d (%s)\n", (int)pids[j],
                            kinds[j] ? step_name(kinds[j]) : "worker", WEXITSTATUS(status),
                            step_name(WEXITSTATUS(status)));
                    failed++;
                    failed_at[WEXITSTATUS(status) & 127]++;
                } else {
                    ok++;
                }
                pids[j] = 0;
                left--;
            }
            if (left > 0)
                pause_ms(1);
        }
        hung_batches += batch_hung;
        /* The parent goes on using its key between batches. */
        if (try_sign(s, key, sig) != CKR_OK)
            parent_failed++;
    }
    char steps[1024] = "";
    for (int i = 0; i < 128; i++) {
        if (failed_at[i] || hung_at[i]) {
            size_t used = strlen(steps);
            snprintf(steps + used, sizeof steps - used, " %s:failed=%d,hung=%d", step_name(i), failed_at[i],
                     hung_at[i]);
        }
    }
    for (int i = 0; i < 65; i++) {
        if (signals[i]) {
            size_t used = strlen(steps);
            snprintf(steps + used, sizeof steps - used, " signal%d=%d", i, signals[i]);
        }
    }
    printf("STORM forks=%d workers=%d exit_children=%d _exit_children=%d ok=%d hung=%d crashed=%d failed=%d "
           "parent_failed=%d stopped_early=%d seconds=%.1f\n",
           forked, started_full, bare_exit, bare__exit, ok, hung, crashed, failed, parent_failed, stopped_early,
           now() - began);
    printf("STEPS%s\n", steps[0] ? steps : " none");
    fflush(stdout);
    finalize();
    printf("DONE\n");
    return 0;
}

static int mode_writer(const char *token, const char *pin, const char *stopfile, int max_s) {
    initialize();
    CK_SESSION_HANDLE s = user_session(token, pin);
    CK_BBOOL yes = CK_TRUE;
    CK_ULONG len = 32;
    double began = now();
    long made = 0;
    struct stat st;
    while (stat(stopfile, &st) != 0 && now() - began < max_s) {
        char label[32];
        snprintf(label, sizeof label, "churn%ld", made);
        CK_ATTRIBUTE t[] = {{CKA_TOKEN, &yes, 1},
                            {CKA_SENSITIVE, &yes, 1},
                            {CKA_ENCRYPT, &yes, 1},
                            {CKA_VALUE_LEN, &len, sizeof len},
                            {CKA_LABEL, label, strlen(label)}};
        CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
        CK_OBJECT_HANDLE k;
        CALL(ST_GENERATE, p11->C_GenerateKey(s, &gen, t, 5, &k));
        CK_MECHANISM ecb = {CKM_AES_ECB, NULL, 0};
        CK_BYTE block[16] = "p11shim churn..", out[16];
        CK_ULONG out_len = 16;
        CALL(ST_ENCRYPT, p11->C_EncryptInit(s, &ecb, k));
        CALL(ST_ENCRYPT, p11->C_Encrypt(s, block, 16, out, &out_len));
        CALL(ST_DESTROY, p11->C_DestroyObject(s, k));
        made++;
    }
    finalize();
    printf("WRITER made_and_destroyed=%ld seconds=%.1f\n", made, now() - began);
    return 0;
}

static int mode_verify(const char *token, const char *pin, int nkeys) {
    initialize();
    CK_SESSION_HANDLE s = user_session(token, pin);
    for (int i = 0; i < nkeys; i++) {
        char label[16];
        snprintf(label, sizeof label, "key%d", i);
        CK_BYTE sig[64];
        sign(s, find(s, CKO_PRIVATE_KEY, label), sig);
        verify(s, find(s, CKO_PUBLIC_KEY, label), sig);
    }
    finalize();
    printf("VERIFY keys=%d ok\n", nkeys);
    return 0;
}

/* Whether the module at `path` is still mapped into this process (dlclose unmaps it only when nothing holds it). */
static int mapped(const char *path) {
    char line[1024];
    int found = 0;
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return -1;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, path) != NULL;
    fclose(f);
    return found;
}

struct use {
    const char *token, *pin, *key;
    int finalize;
};

static void *use_module(void *arg) {
    struct use *u = arg;
    initialize();
    sign_with(user_session(u->token, u->pin), u->key);
    if (u->finalize) {
        finalize();
        char names[1024];
        if (shim_threads(names, sizeof names))
            printf("THREADS-AFTER-FINALIZE %s\n", names);
    }
    return NULL;
}

/* Runs the calls of `u` on this thread, or on a thread of their own that has ended before this returns, as
 * in an application whose worker threads use the module and whose main thread unloads it. */
static void run_use(struct use *u, int on_thread) {
    if (!on_thread) {
        use_module(u);
        return;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, use_module, u) != 0 || pthread_join(t, NULL) != 0) {
        fprintf(stderr, "FAIL pthread\n");
        _exit(ST_USAGE);
    }
}

/*
 * Unloading, as applications do it:
 *   a  C_Finalize, dlclose, exit
 *   b  dlclose without C_Finalize, exit (the application forgot; the module must not crash it)
 *   c  exit without C_Finalize or dlclose (atexit handlers and static destructors run)
 *   d  C_Finalize, dlclose, then dlopen again, C_Initialize, sign, C_Finalize, dlclose, exit
 * The PKCS#11 calls run on the main thread (`main`) or on a worker thread that has ended before the main
 * thread unloads (`thread`). After dlclose the application goes on for a moment, as a server does after
 * unloading a module: a thread of the module that outlived it would run in unmapped code then.
 */
static int mode_unload(const char *shim, const char *token, const char *pin, char how, int on_thread) {
    struct use u = {token, pin, "key0", how == 'a' || how == 'd'};
    load(shim);
    run_use(&u, on_thread);
    if (how != 'c') {
        unload();
        if (how == 'd') {
            load(shim);
            u.key = "key1";
            run_use(&u, on_thread);
            unload();
        }
        printf("MAPPED-AFTER-DLCLOSE %s\n", mapped(shim) ? "yes" : "no");
        pause_ms(20);
    }
    printf("DONE %c\n", how);
    fflush(stdout);
    exit(0);
}

static int mode_threads(const char *token, const char *pin, int rounds) {
    char names[1024];
    for (int r = 0; r < rounds; r++) {
        initialize();
        sign_with(user_session(token, pin), "key0");
        int before = shim_threads(names, sizeof names);
        printf("ROUND %d threads-in-use=%d %s\n", r, before, names);
        finalize();
        if (shim_threads(names, sizeof names)) {
            printf("ALIVE-AFTER-FINALIZE round=%d %s\n", r, names);
            fflush(stdout);
            return ST_THREADS;
        }
    }
    printf("DONE\n");
    return 0;
}

static long stat_ticks(void) {
    char buf[2048];
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    /* After the command: field 3 (state) onwards; utime and stime are fields 14 and 15. */
    unsigned long utime = 0, stime = 0;
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return -1;
    return (long)(utime + stime);
}

static double cpu_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/*
 * An application that opened a database slot and then does nothing: it logs in, signs once with key0 and
 * key1, prints READY, sleeps WINDOW_S seconds and prints the CPU time the whole process (every thread) used
 * meanwhile. Then it waits for a line on stdin and signs once more with each key, printing each CK_RV: the
 * test destroys key0 from another process in between.
 */
static int mode_idle(const char *token, const char *pin, int window) {
    initialize();
    CK_SESSION_HANDLE s = user_session(token, pin);
    CK_OBJECT_HANDLE k0 = find(s, CKO_PRIVATE_KEY, "key0"), k1 = find(s, CKO_PRIVATE_KEY, "key1");
    CK_BYTE sig[64];
    sign(s, k0, sig);
    sign(s, k1, sig);
    printf("READY\n");
    fflush(stdout);
    long t0 = stat_ticks();
    double c0 = cpu_ms(), w0 = now();
    pause_ms(window * 1000L);
    long t1 = stat_ticks();
    double c1 = cpu_ms(), w1 = now();
    long hz = sysconf(_SC_CLK_TCK);
    char names[1024];
    shim_threads(names, sizeof names);
    printf("IDLE seconds=%.1f ticks=%ld clk_tck=%ld stat_ms=%.0f precise_ms=%.3f threads=[%s]\n", w1 - w0, t1 - t0, hz,
           (t1 - t0) * 1000.0 / hz, c1 - c0, names);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) {
        fprintf(stderr, "FAIL no command on stdin\n");
        return ST_USAGE;
    }
    CK_RV r0 = try_sign(s, k0, sig);
    CK_RV r1 = try_sign(s, k1, sig);
    printf("USE key0=0x%lx key1=0x%lx\n", (unsigned long)r0, (unsigned long)r1);
    fflush(stdout);
    finalize();
    printf("DONE\n");
    return 0;
}

static int mode_destroy(const char *token, const char *pin, const char *label) {
    initialize();
    CK_SESSION_HANDLE s = user_session(token, pin);
    CALL(ST_DESTROY, p11->C_DestroyObject(s, find(s, CKO_PRIVATE_KEY, label)));
    finalize();
    printf("DESTROYED %s\n", label);
    return 0;
}

static int mode_spin(int seconds) {
    double until = now() + seconds;
    volatile unsigned long x = 0;
    while (now() < until)
        for (int i = 0; i < 1000000; i++)
            x += i;
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && strcmp(argv[1], "spin") == 0)
        return mode_spin(atoi(argv[2]));
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODE SHIM TOKEN PIN [ARGS...]\n", argv[0]);
        return ST_USAGE;
    }
    const char *mode = argv[1], *shim = argv[2], *token = argv[3], *pin = argv[4];
    int extra = argc - 5;
    char **a = argv + 5;
    if (strcmp(mode, "unload") == 0 && extra == 2)
        return mode_unload(shim, token, pin, a[0][0], strcmp(a[1], "thread") == 0);
    load(shim);
    if (strcmp(mode, "init") == 0 && extra == 2)
        return mode_init(token, pin, a[0], atoi(a[1]));
    if (strcmp(mode, "storm") == 0 && extra == 5)
        return mode_storm(token, pin, atoi(a[0]), atoi(a[1]), atoi(a[2]), atoi(a[3]), atoi(a[4]));
    if (strcmp(mode, "writer") == 0 && extra == 2)
        return mode_writer(token, pin, a[0], atoi(a[1]));
    if (strcmp(mode, "verify") == 0 && extra == 1)
        return mode_verify(token, pin, atoi(a[0]));
    if (strcmp(mode, "threads") == 0 && extra == 1)
        return mode_threads(token, pin, atoi(a[0]));
    if (strcmp(mode, "idle") == 0 && extra == 1)
        return mode_idle(token, pin, atoi(a[0]));
    if (strcmp(mode, "destroy") == 0 && extra == 1)
        return mode_destroy(token, pin, a[0]);
    fprintf(stderr, "unknown mode or arguments: %s\n", mode);
    return ST_USAGE;
}
