//! `p11shim status`: the whole installation at a glance, as `csadm GetState` shows a CryptoServer's: the
//! backend, every slot, the key store, the users, the audit log and restores left pending, then each problem
//! with the command that fixes it. It only reads; it needs no PIN and no logon.

use super::exit::{CliResult, Exit, Failure, Outcome};
use super::users::Seals;
use p11shim::admin;
use p11shim::auth::{self, SealState};
use p11shim::backend;
use p11shim::backup::journal::journal_path;
use p11shim::backup::work::{state_dir, Work};
use p11shim::config::{Config, Storage};
use p11shim::hsm::padded_text;
use p11shim::store::{self, KeyStore};
use serde::Serialize;
use std::io::IsTerminal;

#[derive(clap::Args)]
pub struct StatusArgs {}

#[derive(Serialize)]
struct Status {
    config: String,
    mode: String,
    backend: BackendState,
    slots: Vec<SlotState>,
    store: StoreState,
    /// Restores that were interrupted and left a journal.
    pending_restores: Vec<String>,
    problems: Vec<Problem>,
}

#[derive(Serialize, Default)]
struct BackendState {
    module: String,
    reachable: bool,
    manufacturer: Option<String>,
    library: Option<String>,
    version: Option<String>,
    cryptoki: Option<String>,
    error: Option<String>,
}

#[derive(Serialize)]
struct SlotState {
    token: String,
    /// "database", "pass-through" (a [[slot]] with storage = "hsm") or "pass-through (not configured)".
    storage: String,
    present: bool,
    slot: Option<u64>,
    default_group: Option<String>,
    /// The fingerprint of the token's MBK set.
    mbk: Option<String>,
    /// "device" (the HSM's own MBK) or "set" (p11shim's MBK set in the token).
    mbk_kind: Option<&'static str>,
    /// Why the MBK set is missing or cannot be used.
    mbk_problem: Option<String>,
    /// Key rows of this token in the store.
    stored_keys: Option<u64>,
}

#[derive(Serialize, Default)]
struct StoreState {
    url: String,
    engine: String,
    reachable: bool,
    schema: Option<i64>,
    schema_of_this_build: i64,
    keys: u64,
    groups: Vec<GroupCount>,
    users: Option<UsersState>,
    audit: Option<AuditState>,
    error: Option<String>,
}

#[derive(Serialize)]
struct GroupCount {
    token: String,
    group: String,
    keys: u64,
}

#[derive(Serialize, Default)]
struct UsersState {
    total: usize,
    sealed: usize,
    unsealed: usize,
    broken_seal: usize,
    unchecked: usize,
    locked: usize,
}

#[derive(Serialize, Default)]
struct AuditState {
    entries: u64,
    last_seq: Option<i64>,
    last_time: Option<String>,
    last_action: Option<String>,
    last_who: Option<String>,
    /// "intact", "broken at entry N: …", "not checked: …".
    chain: String,
    intact: bool,
}

#[derive(Serialize)]
struct Problem {
    /// "error" (something does not work as configured) or "warning" (works, but needs a look).
    severity: &'static str,
    what: String,
    fix: String,
}

impl Status {
    fn problem(&mut self, severity: &'static str, what: String, fix: String) {
        self.problems.push(Problem { severity, what, fix });
    }
}

pub fn run(config: &Config, _args: StatusArgs, json: bool) -> CliResult {
    let mut status = Status {
        config: config.source.display().to_string(),
        mode: config.mode.to_string(),
        backend: BackendState { module: config.module.display().to_string(), ..Default::default() },
        slots: Vec::new(),
        store: StoreState {
            url: store::redact(&config.store_url),
            engine: engine(&config.store_url).into(),
            schema_of_this_build: store::SCHEMA_VERSION,
            ..Default::default()
        },
        pending_restores: Vec::new(),
        problems: Vec::new(),
    };
    let store = look_at_store(config, &mut status);
    // The tokens stay open (their MAC keys check users and the audit log) and are closed before the backend
    // is finalized: `works` is dropped before `_backend`.
    let (_backend, works) = look_at_backend(config, store.as_deref(), &mut status);
    if let Some(store) = store.as_deref() {
        look_at_users_and_audit(config, store, &works, &mut status);
    }
    for s in &config.slots {
        let journal = journal_path(&state_dir(config), &s.token);
        if journal.exists() {
            status.pending_restores.push(journal.display().to_string());
            status.problem(
                "error",
                format!("an interrupted restore into token {:?} left its journal {}", s.token, journal.display()),
                format!(
                    "p11shim restore BACKUP --token {} --dry-run (any restore into the token first rolls it back)",
                    s.token
                ),
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string(&status).expect("plain data"));
    } else {
        print_text(&status);
    }
    if !status.backend.reachable || !status.store.reachable {
        let what = if status.backend.reachable { "the key store" } else { "the backend" };
        return Err(Failure::reported(Exit::Unavailable, format!("{what} cannot be reached (see above)")));
    }
    match status.problems.len() {
        0 => Ok(Outcome::Done),
        n => Ok(Outcome::Attention(format!("{n} problems need an operator (listed above, each with its fix)"))),
    }
}

fn engine(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "SQLite"
    } else if url.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "unknown"
    }
}

fn look_at_store(config: &Config, status: &mut Status) -> Option<Box<dyn KeyStore>> {
    let store = match store::open_with(&config.store_url, &config.store) {
        Ok(store) => store,
        Err(e) => {
            status.store.error = Some(e.to_string());
            status.problem(
                "error",
                format!("the key store cannot be opened: {e}"),
                format!("check [store] url in {} and that the database server runs", config.source.display()),
            );
            return None;
        }
    };
    status.store.url = store.describe();
    match store.schema_version() {
        Ok(v) => status.store.schema = Some(v),
        Err(e) => {
            status.store.error = Some(e.to_string());
            status.problem("error", format!("the key store cannot be read: {e}"), "check the database server".into());
            return None;
        }
    }
    status.store.reachable = true;
    match store.key_counts() {
        Ok(counts) => {
            for (token, group, keys) in counts {
                status.store.keys += keys;
                status.store.groups.push(GroupCount { token, group, keys });
            }
        }
        Err(e) => status.problem("error", format!("the key rows cannot be counted: {e}"), "check the database".into()),
    }
    Some(store)
}

/// Loads the backend, lists its tokens, and looks at every configured and present token; returns the opened
/// tokens that have an MBK set (their MAC keys check users and the audit log).
fn look_at_backend(config: &Config, store: Option<&dyn KeyStore>, status: &mut Status) -> (Initialized, Vec<Work>) {
    let backend = match backend::load(config) {
        Ok(b) => b,
        Err(e) => {
            status.backend.error = Some(e.to_string());
            status.problem("error", e.to_string(), format!("check `module` in {}", config.source.display()));
            return (Initialized(None), Vec::new());
        }
    };
    // One initialization for the whole look: the tokens opened below share it.
    let args = cryptoki_sys::CK_C_INITIALIZE_ARGS { flags: cryptoki_sys::CKF_OS_LOCKING_OK, ..Default::default() };
    let guard = match backend.initialize(args) {
        cryptoki_sys::CKR_OK => Initialized(Some(backend)),
        cryptoki_sys::CKR_CRYPTOKI_ALREADY_INITIALIZED => Initialized(None),
        rv => {
            let e = format!("C_Initialize: {}", p11shim::error::rv_name(rv));
            status.backend.error = Some(e.clone());
            status.problem(
                "error",
                format!("the backend {}: {e}", backend.path.display()),
                "check the HSM and its module's configuration".into(),
            );
            return (Initialized(None), Vec::new());
        }
    };
    status.backend.reachable = true;
    if let Ok(info) = backend.info() {
        status.backend.manufacturer = Some(padded_text(&info.manufacturerID));
        status.backend.library = Some(padded_text(&info.libraryDescription));
        status.backend.version = Some(format!("{}.{}", info.libraryVersion.major, info.libraryVersion.minor));
        status.backend.cryptoki = Some(format!("{}.{}", info.cryptokiVersion.major, info.cryptokiVersion.minor));
    }
    let present = match admin::tokens(backend) {
        Ok(p) => p,
        Err(e) => {
            status.backend.error = Some(format!("its tokens cannot be listed: {e}"));
            status.problem("error", format!("the backend's tokens cannot be listed: {e}"), "check the HSM".into());
            Vec::new()
        }
    };
    for missing in admin::missing_slots(config, backend, &present) {
        status.problem(
            "error",
            format!(
                "{}: {missing}: the slot is pass-through until a token with this label appears, so keys made there go into the HSM, not into the key store",
                config.source.display()
            ),
            format!("correct the label in {} (or initialize the token)", config.source.display()),
        );
    }
    // Stored keys per token, owned: the loop below adds problems to `status`.
    let mut stored = std::collections::BTreeMap::<String, u64>::new();
    for g in &status.store.groups {
        *stored.entry(g.token.clone()).or_default() += g.keys;
    }
    let mut works = Vec::new();
    let mut labels: Vec<String> = config.slots.iter().map(|s| s.token.clone()).collect();
    labels.extend(present.iter().map(|(_, l)| l.clone()).filter(|l| !config.slots.iter().any(|s| &s.token == l)));
    for label in labels {
        let configured = config.slots.iter().find(|s| s.token == label);
        let slot = present.iter().find(|(_, l)| *l == label).map(|(s, _)| *s);
        let storage = match configured.map(|s| s.storage) {
            Some(Storage::Database) => "database",
            Some(Storage::Hsm) => "pass-through",
            None => "pass-through (not configured)",
        };
        let mut state = SlotState {
            token: label.clone(),
            storage: storage.into(),
            present: slot.is_some(),
            slot,
            default_group: configured.map(|s| s.default_group.clone()),
            mbk: None,
            mbk_kind: None,
            mbk_problem: None,
            stored_keys: (store.is_some() && storage == "database").then(|| stored.get(&label).copied().unwrap_or(0)),
        };
        if slot.is_some() {
            match Work::open_public_lenient(config, &label) {
                Ok(work) => {
                    state.mbk = Some(work.set.fingerprint.clone());
                    state.mbk_kind = Some(work.set.kind());
                    if let Some(why) = &work.set.outdated {
                        state.mbk_problem = Some(why.clone());
                        status.problem("error", format!("token {label:?}: {why}"), "see `p11shim mbk --help`".into());
                    }
                    works.push(work);
                }
                Err(e) => {
                    state.mbk_problem = Some(e.to_string());
                    if storage == "database" {
                        status.problem(
                            "error",
                            format!("database slot {label:?} has no usable MBK set ({e}): keys cannot be stored there"),
                            format!("p11shim mbk create --token {label}"),
                        );
                    }
                }
            }
        }
        status.slots.push(state);
    }
    (guard, works)
}

/// The backend initialized by `status`, finalized when dropped (after the tokens opened on it).
struct Initialized(Option<&'static p11shim::backend::Backend>);

impl Drop for Initialized {
    fn drop(&mut self) {
        if let Some(backend) = self.0 {
            let _ = backend.finalize();
        }
    }
}

fn look_at_users_and_audit(config: &Config, store: &dyn KeyStore, works: &[Work], status: &mut Status) {
    let Some((main, others)) = works.split_first() else {
        if !config.slots.is_empty() {
            status.problem(
                "warning",
                "no token of the config has an MBK set, whose MAC key seals users and the audit log: they were not checked".into(),
                "p11shim mbk create --token LABEL".into(),
            );
        }
        return;
    };
    let seals = Seals::new(main, others);
    let trail = seals.trail(store, config);
    match auth::list_users(&trail, &config.logon) {
        Ok(users) => {
            let mut u = UsersState { total: users.len(), ..Default::default() };
            for user in &users {
                match user.seal {
                    SealState::Intact => u.sealed += 1,
                    SealState::Unsealed => u.unsealed += 1,
                    SealState::Broken => u.broken_seal += 1,
                    SealState::Unchecked => u.unchecked += 1,
                }
                if user.locked {
                    u.locked += 1;
                    status.problem(
                        "warning",
                        format!("user {} is locked after {} failed logons", user.name, user.failed),
                        format!("p11shim user unlock {} --logon ADMIN", user.name),
                    );
                }
            }
            if u.broken_seal > 0 {
                status.problem(
                    "error",
                    format!("{} users rows do not match their seal: changed by a writer of the store", u.broken_seal),
                    "p11shim user list (then delete them, or restore the users table from a backup)".into(),
                );
            }
            if u.unsealed > 0 {
                status.problem(
                    "warning",
                    format!("{} users rows are not sealed yet (made by an earlier version)", u.unsealed),
                    "p11shim user reseal --logon ADMIN".into(),
                );
            }
            status.store.users = Some(u);
        }
        Err(e) => status.problem("error", format!("the users cannot be read: {e}"), "check the key store".into()),
    }
    let mut audit = AuditState::default();
    let mut last = None;
    let scanned = store.audit_scan(&mut |e| {
        last = Some(e);
        Ok(())
    });
    if let Some(e) = last {
        audit.last_seq = Some(e.seq);
        audit.last_time = Some(e.draft.time);
        audit.last_action = Some(e.draft.action);
        audit.last_who = Some(e.draft.who);
    }
    match scanned.map_err(|e| e.to_string()).and_then(|()| p11shim::audit::verify(&trail).map_err(|e| e.to_string())) {
        Ok(report) => {
            audit.entries = report.entries;
            match &report.first_bad {
                Some(bad) => {
                    audit.chain = format!("broken at entry {}: {}", bad.seq, bad.reason);
                    status.problem(
                        "error",
                        format!("the audit log is broken at entry {}: {}", bad.seq, bad.reason),
                        "p11shim audit verify (it names what was checked); keep the store for investigation".into(),
                    );
                }
                None if report.unverifiable.is_empty() => {
                    audit.chain = "intact".into();
                    audit.intact = true;
                }
                None => {
                    audit.chain = "intact, but some entries were sealed under MBK sets no token here holds".into();
                    audit.intact = true;
                }
            }
        }
        Err(e) => {
            audit.chain = format!("not checked: {e}");
            status.problem("error", format!("the audit log cannot be checked: {e}"), "p11shim audit verify".into());
        }
    }
    status.store.audit = Some(audit);
}

fn print_text(s: &Status) {
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let red = |t: &str| if color { format!("\x1b[1;31m{t}\x1b[0m") } else { t.to_string() };
    let yellow = |t: &str| if color { format!("\x1b[1;33m{t}\x1b[0m") } else { t.to_string() };
    let green = |t: &str| if color { format!("\x1b[32m{t}\x1b[0m") } else { t.to_string() };
    println!("config   {} (mode {})", s.config, s.mode);
    let b = &s.backend;
    match (&b.error, b.reachable) {
        (Some(e), false) => println!("backend  {}: {}", b.module, red(&format!("UNAVAILABLE: {e}"))),
        _ => println!(
            "backend  {}: {} {} (by {}), Cryptoki {}",
            b.module,
            b.library.as_deref().unwrap_or("?"),
            b.version.as_deref().unwrap_or("?"),
            b.manufacturer.as_deref().unwrap_or("?"),
            b.cryptoki.as_deref().unwrap_or("?")
        ),
    }
    println!("slots");
    for slot in &s.slots {
        let place = match slot.slot {
            Some(id) => format!("slot {id}"),
            None => red("NOT PRESENT"),
        };
        let mbk = match (&slot.mbk, &slot.mbk_problem, slot.present) {
            (_, _, false) => String::new(),
            (Some(f), None, _) if slot.mbk_kind == Some("device") => format!("device MBK {f}"),
            (Some(f), None, _) => format!("MBK set {f}"),
            (Some(f), Some(_), _) => red(&format!("MBK {f} OUTDATED")),
            (None, _, _) if slot.storage == "database" => red("NO MBK SET"),
            (None, _, _) => "no MBK set".into(),
        };
        let group = slot.default_group.as_ref().map(|g| format!("  default group {g:?}")).unwrap_or_default();
        let keys = slot.stored_keys.map(|n| format!("  {n} stored keys")).unwrap_or_default();
        println!("  {:<34} {:<30} {place}  {mbk}{group}{keys}", format!("{:?}", slot.token), slot.storage);
    }
    let st = &s.store;
    if st.reachable {
        let schema = match st.schema {
            Some(v) if v == st.schema_of_this_build => format!("schema {v}"),
            Some(v) => yellow(&format!("schema {v} (this build: {})", st.schema_of_this_build)),
            None => "schema ?".into(),
        };
        println!("store    {} ({}): reachable, {schema}, {} keys", st.url, st.engine, st.keys);
        for g in &st.groups {
            println!("  token {:?} group {:?}: {}", g.token, g.group, g.keys);
        }
    } else {
        println!(
            "store    {} ({}): {}",
            st.url,
            st.engine,
            red(&format!("UNAVAILABLE: {}", st.error.as_deref().unwrap_or("?")))
        );
    }
    if let Some(u) = &st.users {
        println!(
            "users    {} ({} sealed, {} unsealed, {} broken seal, {} locked)",
            u.total, u.sealed, u.unsealed, u.broken_seal, u.locked
        );
    }
    if let Some(a) = &st.audit {
        let last = match (&a.last_seq, &a.last_time, &a.last_action, &a.last_who) {
            (Some(seq), Some(t), Some(action), Some(who)) => format!(", last #{seq} {t} {action:?} by {who}"),
            _ => String::new(),
        };
        let chain = if a.intact { green(&a.chain) } else { red(&a.chain) };
        println!("audit    {} entries{last}; chain {chain}", a.entries);
    }
    if s.pending_restores.is_empty() {
        println!("restores none pending");
    } else {
        for j in &s.pending_restores {
            println!("restores {}", red(&format!("PENDING: {j}")));
        }
    }
    if s.problems.is_empty() {
        println!("{}", green("no problems found"));
        return;
    }
    println!("problems ({})", s.problems.len());
    for p in &s.problems {
        let tag = if p.severity == "error" { red("ERROR  ") } else { yellow("WARNING") };
        println!("  {tag} {}", p.what);
        println!("          fix: {}", p.fix);
    }
}
