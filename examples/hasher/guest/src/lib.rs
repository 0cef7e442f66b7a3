//! A worker that hashes and verifies passwords with Argon2id.
//!
//! Password hashing is slow on purpose and memory-hungry (the defaults use
//! 19 MiB per hash), which makes it a good job for a pool of sandboxed
//! workers: the daemon bounds how many run at once and what each may touch.
//!
//! Hashes are PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`)
//! with a fresh random salt from WASI's `random_get`, so they carry their own
//! parameters and `verify` works across parameter changes.

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{Error, PasswordHasher, PasswordVerifier};
use serde::Deserialize;
use wasm_task_guest::{export, log};

/// Hashes `password` with Argon2id and the crate's default parameters.
fn hash(password: String) -> Result<String, Error> {
    log::debug!("hashing a password of {} bytes", password.len());
    let hash: PasswordHash = Argon2::default().hash_password(password.as_bytes())?;
    Ok(hash.to_string())
}

/// Arguments of [`verify`].
#[derive(Debug, Deserialize)]
struct Verify {
    /// The password to check.
    password: String,
    /// A PHC string made by [`hash`] (or any Argon2 PHC string).
    hash: String,
}

/// Checks `password` against `hash`.
///
/// A wrong password is `Ok(false)`; a hash that is not a valid Argon2 PHC
/// string is an error, since no password could ever match it.
fn verify(args: Verify) -> Result<bool, String> {
    log::debug!("verifying a password against a hash of {} bytes", args.hash.len());
    let hash = PasswordHash::new(&args.hash).map_err(|e| format!("malformed hash: {e}"))?;
    match Argon2::default().verify_password(args.password.as_bytes(), &hash) {
        Ok(()) => Ok(true),
        Err(Error::PasswordInvalid) => Ok(false),
        Err(e) => Err(format!("checking the password against the hash: {e}")),
    }
}

export! {
    methods: { "hash" => hash, "verify" => verify },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(password: &str, hash: &str) -> Result<bool, String> {
        super::verify(Verify { password: password.into(), hash: hash.into() })
    }

    #[test]
    fn hash_verifies_with_its_password_only() {
        let hash = hash("correct horse".into()).unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert_eq!(verify("correct horse", &hash), Ok(true));
        assert_eq!(verify("battery staple", &hash), Ok(false));
    }

    #[test]
    fn malformed_hash_is_an_error_not_a_mismatch() {
        let err = verify("pw", "not a hash").unwrap_err();
        assert!(err.starts_with("malformed hash: "), "{err}");
    }

    #[test]
    fn hash_of_another_algorithm_is_an_error() {
        let err = verify("pw", "$md5$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA").unwrap_err();
        assert!(err.starts_with("checking the password against the hash: "), "{err}");
    }
}
