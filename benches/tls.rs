//! What TLS costs the PostgreSQL key store: the same operations against a plaintext cluster and a TLS-only
//! cluster (verify-full, ECDSA P-256 certificates of a test CA), both throwaway clusters on 127.0.0.1 started
//! with scripts/pg-cluster.sh, in one run:
//!
//! 1. first use in a process: `store::open` (a connection for statements and one for the change listener,
//!    each with its handshake, and the schema check) and one find by label;
//! 2. a find by label among 10,000 rows on an open connection (one round trip);
//! 3. a read of one row by id (one round trip).
//!
//! `cargo bench --bench tls` prints a table (also written to target/bench-tls.txt) with medians, p99s and
//! the TLS/plaintext ratios. Without `--bench` (cargo test --benches) it runs a few of each and checks that
//! the TLS store really speaks TLS (a plaintext client is refused) and answers what the plaintext one does.

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;
#[path = "../tests/common/pgtls.rs"]
#[allow(dead_code)]
mod pgtls;

use p11shim::store::{self, KeyQuery, KeyRow};
use pg::PgCluster;
use pgtls::{port, tls_only, Pki};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-tls";

fn row(i: u32) -> KeyRow {
    KeyRow {
        id: format!("{i:032x}"),
        token: TOKEN.into(),
        group: "g".into(),
        class: 4,
        key_type: 31,
        label: format!("tls-{i:06}").into_bytes(),
        ckid: i.to_be_bytes().to_vec(),
        attrs: vec![0; 200],
        wrapped: vec![0xAB; 40],
        wrap_mech: 0x210A,
        mbk: "bench".into(),
        mac: vec![0xCD; 32],
        version: 1,
    }
}

/// Median and 99th percentile of `times`.
fn percentiles(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn measure(n: usize, mut f: impl FnMut(usize)) -> (Duration, Duration) {
    f(0); // warm-up, not counted
    percentiles(
        (0..n)
            .map(|i| {
                let t = Instant::now();
                f(i);
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (rows, opens, reads) = if bench { (10_000, 50, 5_000) } else { (200, 3, 50) };
    let started = Instant::now();
    let pki = Pki::make();
    let tls_cluster = PgCluster::start();
    tls_only(&tls_cluster, &pki);
    let plain_cluster = PgCluster::start();
    let tls_url = format!(
        "postgres://postgres@localhost:{}/p11shim?sslmode=verify-full&sslrootcert={}",
        port(tls_cluster.url()),
        pki.path("ca.pem").display()
    );
    let plain_url = format!("{}?sslmode=disable", plain_cluster.url());
    // The TLS server refuses a plaintext client: what is measured there is TLS.
    let refused = store::open(&format!("{}?sslmode=disable", tls_cluster.url())).err().map(|e| e.to_string());
    assert!(refused.as_deref().is_some_and(|e| e.contains("no encryption")), "{refused:?}");

    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<44} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "", "plain p50", "plain p99", "TLS p50", "TLS p99", "ratio"
    );
    let mut results = Vec::new();
    for (name, url) in [("plain", &plain_url), ("tls", &tls_url)] {
        let s = store::open(url).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut tx = s.begin().unwrap();
        for i in 0..rows {
            tx.insert(&row(i)).unwrap();
        }
        tx.commit().unwrap();
        let query = |i: usize| KeyQuery {
            token: TOKEN.into(),
            label: Some(format!("tls-{:06}", (i * 7919) % rows as usize).into_bytes()),
            ..Default::default()
        };
        let first = measure(opens, |i| {
            let opened = store::open(url).unwrap();
            assert_eq!(opened.find(&query(i)).unwrap().len(), 1);
        });
        let find = measure(reads, |i| assert_eq!(s.find(&query(i)).unwrap().len(), 1));
        let get = measure(reads, |i| {
            assert!(s.get(&format!("{:032x}", (i * 7919) % rows as usize)).unwrap().is_some());
        });
        results.push([first, find, get]);
    }
    for (k, what) in [
        "first use in a process (open + find)",
        "find by label among the rows (one round trip)",
        "read one row by id (one round trip)",
    ]
    .iter()
    .enumerate()
    {
        let ((p50, p99), (t50, t99)) = (results[0][k], results[1][k]);
        let _ = writeln!(
            table,
            "{what:<44} {:>12?} {:>12?} {:>12?} {:>12?} {:>7.2}",
            p50,
            p99,
            t50,
            t99,
            t50.as_secs_f64() / p50.as_secs_f64()
        );
    }
    let _ =
        writeln!(table, "({rows} rows; {opens} opens, {reads} finds and reads each; took {:.0?})", started.elapsed());
    print!("{table}");
    if bench {
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tls.txt");
        std::fs::write(&out, &table).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    }
}
