//! The configuration file (src/config.rs): `Config::parse` with and without a module override, as
//! `Config::from_env` calls it. What parses keeps the documented ranges; every error is one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p11shim::config::Config;
use std::path::{Path, PathBuf};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for (path, module) in [("/etc/p11shim/p11shim.toml", None), ("p11shim.toml", Some("/opt/hsm/lib.so"))] {
        match Config::parse(text, Path::new(path), module.map(PathBuf::from)) {
            Ok(config) => {
                assert!((1..=1_000_000).contains(&config.hsm_cache));
                assert!(
                    config.store_url.starts_with("sqlite:")
                        || config.store_url.starts_with("postgres://")
                        || config.store_url.starts_with("postgresql://")
                );
                for (i, slot) in config.slots.iter().enumerate() {
                    assert!(!slot.token.is_empty() && !slot.default_group.is_empty());
                    assert!(config.slots[..i].iter().all(|other| other.token != slot.token));
                }
                for failed in [0, 1, 2, 21, u32::MAX] {
                    assert!(config.logon.wait_after(failed) <= config.logon.delay_max);
                }
                if let Some(module) = module {
                    assert_eq!(config.module, Path::new(module));
                }
            }
            Err(e) => {
                let message = e.to_string();
                assert!(!message.contains('\n'), "a configuration error is one line: {message:?}");
            }
        }
    }
});
