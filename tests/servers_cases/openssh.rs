//! OpenSSH (Debian 12: 9.2p1) with its keys in a database slot: a user key (EC P-256) and a host key
//! (RSA-2048) generated through the shim with pkcs11-tool, and a throwaway sshd on 127.0.0.1 that accepts
//! the user key and proves its host key through ssh-agent.
//!
//! - `ssh -I <shim>` loads the shim itself (OpenSSH 9.2 loads a PKCS#11 provider in the ssh process) and asks
//!   for the PIN with SSH_ASKPASS (`SSH_ASKPASS_REQUIRE=force`: no terminal, no DISPLAY needed). With
//!   `IdentitiesOnly=yes`, ssh uses a provider's key only when its public key is also given as an identity
//!   file (`-i user.pub`): ssh_config(5) says IdentitiesOnly excludes what a PKCS11Provider offers.
//! - `ssh-agent -P <allow-list>` loads the shim in its ssh-pkcs11-helper (a child it forks and executes, which
//!   inherits its environment) after `ssh-add -s <shim>` (PIN through SSH_ASKPASS). The agent refuses a
//!   provider outside its allow-list (by default "/usr/lib/*,/usr/local/lib/*", ssh-agent(1)), so an agent
//!   without -P refuses the shim in target/.
//! - sshd reaches the host key through the agent (`HostKey host.pub` + `HostKeyAgent <socket>`): sshd itself
//!   loads no PKCS#11 module. The second login checks the host key strictly against a known_hosts file
//!   holding the stored key's public half.
//!
//! Only the processes that load the shim (pkcs11-tool, ssh-keygen -D, ssh -I, ssh-agent) get P11SHIM_CONFIG
//! and SOFTHSM2_CONF; ssh-add, sshd and the ssh that logs in through the agent run without them.

use super::*;

const TOKEN: &str = "ssh";
const USER_KEY: &str = "ssh-user";
const HOST_KEY: &str = "ssh-host";
/// The account the logins use: sshd runs as root and only root may log in as root without more set-up.
const USER: &str = "root";

/// A unix socket path for `name` in `dir`, or in the temporary directory when that would be too long for a
/// socket address (about 107 bytes).
fn socket_path(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.sock"));
    if path.as_os_str().len() < 100 {
        path
    } else {
        std::env::temp_dir().join(format!("p11shim-servers-{}-{name}.sock", std::process::id()))
    }
}

/// The line of `ssh-keygen -D` (type, key, comment = the PKCS#11 label) for `label`.
fn key_line<'a>(listing: &'a str, label: &str) -> &'a str {
    listing
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(label))
        .unwrap_or_else(|| panic!("ssh-keygen -D through the shim lists no key labelled {label:?}:\n{listing}"))
}

/// "type base64" of an OpenSSH public key line, without its comment.
fn key_blob(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

pub fn user_and_host_keys_in_a_database_slot() {
    assert!(
        is_root(),
        "this test runs sshd, which needs root (privilege separation) and logs in as root: run it as root"
    );
    let started = Instant::now();
    let fx = Fixture::new("openssh_keys", TOKEN, Store::Sqlite);
    fx.keypair("EC:prime256v1", "01", USER_KEY);
    fx.keypair("rsa:2048", "02", HOST_KEY);
    fx.assert_stored(USER_KEY);
    fx.assert_stored(HOST_KEY);
    let shim = common::shim_path();
    let mut findings = Findings::default();
    findings.note(format!("token and keys ready after {:.1}s", started.elapsed().as_secs_f64()));

    // The public keys as OpenSSH sees them through the shim, checked against the stored public keys.
    let ssh_keygen = tool("ssh-keygen", "openssh-client");
    let mut list = fx.command(&ssh_keygen);
    list.arg("-D").arg(&shim);
    let listing = fx.run(list).ok().stdout;
    let user_line = key_line(&listing, USER_KEY).to_string();
    let host_line = key_line(&listing, HOST_KEY).to_string();
    assert!(user_line.starts_with("ecdsa-sha2-nistp256 "), "{user_line}");
    assert!(host_line.starts_with("ssh-rsa "), "{host_line}");
    for (label, line) in [(USER_KEY, &user_line), (HOST_KEY, &host_line)] {
        let pem = fx.dir.join(format!("{label}.pub.pem"));
        std::fs::write(&pem, fx.public_key_pem(label)).unwrap();
        let mut convert = fx.bare_command(&ssh_keygen);
        convert.args(["-i", "-m", "PKCS8", "-f"]).arg(&pem);
        let converted = fx.run(convert).ok().stdout;
        assert_eq!(key_blob(&converted), key_blob(line), "{label}: ssh-keygen -D shows the stored public key");
    }
    let user_pub = fx.dir.join("user.pub");
    let host_pub = fx.dir.join("host.pub");
    std::fs::write(&user_pub, format!("{user_line}\n")).unwrap();
    std::fs::write(&host_pub, format!("{host_line}\n")).unwrap();
    let mut fingerprint = fx.bare_command(&ssh_keygen);
    fingerprint.arg("-l").arg("-f").arg(&user_pub);
    let fingerprint = fx.run(fingerprint).ok().stdout;
    let user_fp = fingerprint.split_whitespace().nth(1).expect("ssh-keygen -l prints a fingerprint").to_string();

    // SSH_ASKPASS: prints the PIN, and records each prompt.
    let askpass = fx.dir.join("askpass.sh");
    let askpass_log = fx.dir.join("askpass.log");
    std::fs::write(
        &askpass,
        format!("#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\necho '{USER_PIN}'\n", askpass_log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&askpass, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let prompts = || std::fs::read_to_string(&askpass_log).unwrap_or_default();
    let with_askpass = |cmd: &mut Command| {
        cmd.env("SSH_ASKPASS", &askpass).env("SSH_ASKPASS_REQUIRE", "force");
    };
    let ssh_add = |socket: &Path| {
        let mut cmd = fx.bare_command(&tool("ssh-add", "openssh-client"));
        with_askpass(&mut cmd);
        cmd.env("SSH_AUTH_SOCK", socket).arg("-s").arg(&shim);
        fx.run(cmd)
    };
    let agent_cmd = |socket: &Path, allow: Option<&str>| {
        let mut cmd = fx.command(&tool("ssh-agent", "openssh-client"));
        cmd.arg("-D").arg("-a").arg(socket);
        if let Some(allow) = allow {
            cmd.args(["-P", allow]);
        }
        cmd
    };

    // An agent with the default allow-list refuses the shim (it is not under /usr/lib/ or /usr/local/lib/).
    let refusing_socket = socket_path(&fx.dir, "agent-default");
    let _ = std::fs::remove_file(&refusing_socket);
    {
        let mut agent = Server::start(
            "ssh-agent (default -P)",
            agent_cmd(&refusing_socket, None),
            &fx.dir.join("agent-default.log"),
        );
        agent.wait_for_socket(&refusing_socket, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
        let out = ssh_add(&refusing_socket);
        findings.check(!out.success() && out.stderr.contains("agent refused operation"), || {
            format!("an agent without -P must refuse the shim (\"agent refused operation\"): {}", out.failure())
        });
    }
    let _ = std::fs::remove_file(&refusing_socket);

    // The agent sshd and the second login use: allowed to load modules from the shim's directory.
    let socket = socket_path(&fx.dir, "agent");
    let _ = std::fs::remove_file(&socket);
    let allow = format!("{}/*", shim.parent().unwrap().display());
    let mut agent = Server::start("ssh-agent", agent_cmd(&socket, Some(&allow)), &fx.dir.join("agent.log"));
    agent.wait_for_socket(&socket, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let added = ssh_add(&socket);
    findings.check(added.success(), || format!("ssh-add -s <shim> to an agent with -P {allow}: {}", added.failure()));
    findings.check(prompts().contains("Enter passphrase for PKCS#11"), || {
        format!("ssh-add asked for no PIN through SSH_ASKPASS; prompts: {:?}", prompts())
    });
    let mut agent_keys = fx.bare_command(&tool("ssh-add", "openssh-client"));
    agent_keys.env("SSH_AUTH_SOCK", &socket).arg("-L");
    let agent_keys = fx.run(agent_keys);
    for line in [&user_line, &host_line] {
        findings.check(agent_keys.stdout.contains(&key_blob(line)), || {
            format!("the agent does not hold {line}: {}", agent_keys.failure())
        });
    }
    let helpers: Vec<Proc> = agent.group().into_iter().filter(|p| p.cmdline.contains("ssh-pkcs11-helper")).collect();
    findings.note(format!("ssh-agent {} runs the shim in {helpers:?}", agent.pid()));

    // sshd: the Debian package's runtime directory for privilege separation exists only once its service ran.
    let privsep = Path::new("/run/sshd");
    if !privsep.exists() {
        std::fs::create_dir_all(privsep).expect("create /run/sshd");
        std::fs::set_permissions(privsep, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let ed25519 = fx.dir.join("hostkey_ed25519");
    let mut make_host_key = fx.bare_command(&ssh_keygen);
    make_host_key.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&ed25519);
    fx.run(make_host_key).ok();
    let authorized_keys = fx.dir.join("authorized_keys");
    std::fs::write(&authorized_keys, format!("{user_line}\n")).unwrap();
    let port = free_port();
    let sshd_config = fx.dir.join("sshd_config");
    std::fs::write(
        &sshd_config,
        format!(
            "# Written by tests/servers_cases/openssh.rs.\nPort {port}\nListenAddress 127.0.0.1\n\
             HostKey {ed25519}\n# The stored RSA key: its public half here, signatures from the agent.\n\
             HostKey {host_pub}\nHostKeyAgent {socket}\n\
             PidFile {pid}\nAuthorizedKeysFile {authorized_keys}\nStrictModes no\nUsePAM no\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AuthenticationMethods publickey\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n",
            ed25519 = ed25519.display(),
            host_pub = host_pub.display(),
            socket = socket.display(),
            pid = fx.dir.join("sshd.pid").display(),
            authorized_keys = authorized_keys.display(),
        ),
    )
    .unwrap();
    let sshd_path = tool("sshd", "openssh-server");
    let mut test_config = fx.bare_command(&sshd_path);
    test_config.arg("-t").arg("-f").arg(&sshd_config);
    fx.run(test_config).ok();
    let sshd_log = fx.dir.join("sshd.log");
    let mut sshd_cmd = fx.bare_command(&sshd_path);
    sshd_cmd.arg("-D").arg("-f").arg(&sshd_config).arg("-E").arg(&sshd_log);
    let mut sshd = Server::start("sshd", sshd_cmd, &fx.dir.join("sshd.out"));
    if let Err(e) = sshd.wait_for_port(port, Duration::from_secs(10)) {
        panic!(
            "{e}\n--- sshd's output\n{}\n--- sshd.log\n{}",
            sshd.output_text(),
            std::fs::read_to_string(&sshd_log).unwrap_or_default()
        );
    }

    let ssh = tool("ssh", "openssh-client");
    let target = format!("{USER}@127.0.0.1");
    let common_args = ["-F", "/dev/null", "-o", "ConnectTimeout=10", "-o", "IdentitiesOnly=yes", "-p"];

    // 1. ssh -I <shim>: the shim in the ssh process, the PIN through SSH_ASKPASS.
    let mut direct = fx.command(&ssh);
    with_askpass(&mut direct);
    direct
        .args(common_args)
        .arg(port.to_string())
        .arg("-I")
        .arg(&shim)
        .arg("-i")
        .arg(&user_pub)
        .args(["-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args([&target, "echo", "p11shim-login-ssh-I"]);
    let t = Instant::now();
    let out = fx.run(direct);
    findings.note(format!("ssh -I login took {:.2}s", t.elapsed().as_secs_f64()));
    findings.check(out.success() && out.stdout.contains("p11shim-login-ssh-I"), || {
        format!("ssh -I <shim> -i user.pub must log in: {}", out.failure())
    });
    findings.check(prompts().contains(&format!("Enter PIN for '{TOKEN}'")), || {
        format!("ssh -I asked for no PIN through SSH_ASKPASS; prompts: {:?}", prompts())
    });

    // 2. Through the agent, without the shim's environment; the host key strictly checked: the server's
    //    RSA host key signature comes from the stored key, through the same agent.
    let known_hosts = fx.dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {}\n", key_blob(&host_line))).unwrap();
    let mut via_agent = fx.bare_command(&ssh);
    via_agent
        .args(common_args)
        .arg(port.to_string())
        .arg("-i")
        .arg(&user_pub)
        .arg("-o")
        .arg(format!("IdentityAgent={}", socket.display()))
        .args(["-o", "HostKeyAlgorithms=rsa-sha2-512,rsa-sha2-256", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([&target, "echo", "p11shim-login-agent"]);
    let t = Instant::now();
    let out = fx.run(via_agent);
    findings.note(format!("login through the agent took {:.2}s", t.elapsed().as_secs_f64()));
    findings.check(out.success() && out.stdout.contains("p11shim-login-agent"), || {
        format!(
            "ssh through ssh-agent (user key from the agent, host key checked against the stored RSA key) must log \
             in: {}",
            out.failure()
        )
    });

    let sshd_text = std::fs::read_to_string(&sshd_log).unwrap_or_default();
    let accepted = sshd_text
        .lines()
        .filter(|l| l.contains(&format!("Accepted publickey for {USER}")) && l.contains(&user_fp))
        .count();
    findings.check(accepted == 2, || {
        format!("sshd.log shows {accepted} logins with the stored user key {user_fp} (want 2)")
    });
    let problems = fx.shim_log_problems();
    let errors: Vec<&String> = problems.iter().filter(|l| l.contains(" ERROR: ")).collect();
    findings.check(errors.is_empty(), || {
        format!("the shim logged {} error(s):\n{}", errors.len(), tally(errors.iter().map(|l| log_message(l))))
    });
    findings.check(!fx.pins_in_log(), || "a PIN appears in the shim's log".to_string());
    findings.note(format!("the whole test took {:.1}s", started.elapsed().as_secs_f64()));
    sshd.kill();
    agent.kill();
    findings.assert_none("openssh_user_and_host_keys_in_a_database_slot", || {
        format!(
            "--- sshd.log\n{sshd_text}\n--- ssh-agent's output\n{}\n--- askpass prompts\n{}\n\
             --- the shim's ERROR/WARN lines ({})\n{}",
            agent.output_text(),
            prompts(),
            fx.log.display(),
            tally(problems.iter().map(|l| log_message(l)))
        )
    });
}
