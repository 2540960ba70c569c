//! Creates token data objects on slot 0 of the simulator until it is killed: the crash-safety test kills it
//! at random moments and checks the state file after each kill.
//!
//! Usage: `cssim_writer <path to libcssim.so> <user PIN>` with `CSSIM_CONFIG` set.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

fn main() {
    let mut args = std::env::args().skip(1);
    let (module, pin) = match (args.next(), args.next()) {
        (Some(m), Some(p)) => (m, p),
        _ => {
            eprintln!("usage: cssim_writer <libcssim.so> <user PIN>");
            std::process::exit(2);
        }
    };
    let p11 = Pkcs11::new(module).expect("load the module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
    let slot = p11.get_all_slots().expect("slots")[0];
    let session = p11.open_rw_session(slot).expect("session");
    session.login(UserType::User, Some(&AuthPin::new(pin.into()))).expect("login");
    for i in 0u64.. {
        session
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Label(format!("w{i}").into_bytes()),
                Attribute::Value(vec![i as u8; 4096]),
            ])
            .expect("create a token object");
        println!("{i}");
    }
}
