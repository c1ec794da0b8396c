//! The client side of SCRAM-SHA-256 from keys instead of a password: a ClientKey recovered
//! from a client's proof and the verifier's ServerKey log the proxy in to a server holding
//! the same verifier, so no password needs to be stored anywhere.

use super::scram::ScramKeys;
use super::verifier::{hmac_sha256, sha256};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use subtle::ConstantTimeEq;

/// One exchange, from client-first to the check of the server's signature.
pub struct KeyedScram {
    keys: ScramKeys,
    /// GS2 header plus channel-binding data, base64 in client-final's `c=`.
    cbind_input: Vec<u8>,
    client_nonce: String,
    client_first_bare: String,
    /// AuthMessage once server-first arrived.
    auth_message: Option<String>,
}

impl KeyedScram {
    /// `gs2_header` is `n,,`, `y,,` or `p=tls-server-end-point,,` with `cb_data` the
    /// server certificate's hash.
    pub fn new(keys: ScramKeys, gs2_header: &str, cb_data: &[u8]) -> Self {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let client_nonce = B64.encode(raw);
        let mut cbind_input = gs2_header.as_bytes().to_vec();
        cbind_input.extend_from_slice(cb_data);
        KeyedScram {
            keys,
            cbind_input,
            client_first_bare: format!("n=,r={client_nonce}"),
            client_nonce,
            auth_message: None,
        }
    }

    /// client-first-message (the GS2 header and the bare part).
    pub fn client_first(&self, gs2_header: &str) -> String {
        format!("{gs2_header}{}", self.client_first_bare)
    }

    /// Takes server-first, returns client-final with the proof.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, String> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| "not UTF-8")?;
        let mut nonce = None;
        for attr in server_first.split(',') {
            if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let nonce = nonce.ok_or("server-first lacks a nonce")?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err("server nonce does not extend ours".into());
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(&self.cbind_input));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key = sha256(&self.keys.client_key);
        let signature = hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
        let mut proof = self.keys.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final's signature: the server must prove it holds the same verifier.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), String> {
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or("SASL final before continue")?;
        let text = std::str::from_utf8(server_final).map_err(|_| "not UTF-8")?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(format!("server error {e}"));
        }
        let v = text
            .strip_prefix("v=")
            .ok_or("server-final lacks a signature")?;
        let got = B64.decode(v).map_err(|_| "signature is not base64")?;
        let want = hmac_sha256(&self.keys.server_key, &[auth_message.as_bytes()]);
        if bool::from(got.as_slice().ct_eq(&want)) {
            Ok(())
        } else {
            Err("server signature does not match".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::ClientFirst;
    use crate::auth::scram::Exchange;
    use crate::auth::ScramVerifier;

    /// Our server side recovers the keys from a password client's proof; those keys then
    /// pass our own server side again, as a fresh exchange (what the upstream does).
    #[test]
    fn keys_recovered_from_a_proof_log_in_again() {
        let v = ScramVerifier::from_password("pencil", b"salty-salt-salt!", 4096);
        let keys = {
            let mut c = KeyedScram::new(
                ScramKeys {
                    client_key: hmac_sha256(&salted("pencil", &v), &[b"Client Key"]),
                    server_key: v.server_key,
                },
                "n,,",
                &[],
            );
            let ex = Exchange::new(&v, ClientFirst::parse(&c.client_first("n,,")).unwrap());
            let fin = c.client_final(ex.server_first().as_bytes()).unwrap();
            let passed = ex
                .finish(&fin, true)
                .unwrap()
                .expect("password proof passes");
            c.verify(passed.server_final.as_bytes()).unwrap();
            passed.keys
        };
        let mut c = KeyedScram::new(keys.clone(), "n,,", &[]);
        let ex = Exchange::new(&v, ClientFirst::parse(&c.client_first("n,,")).unwrap());
        let fin = c.client_final(ex.server_first().as_bytes()).unwrap();
        let passed = ex.finish(&fin, true).unwrap().expect("keyed proof passes");
        assert_eq!(passed.keys, keys);
        c.verify(passed.server_final.as_bytes()).unwrap();
        assert!(
            c.verify(b"v=AAAA").is_err(),
            "a wrong server signature is refused"
        );

        // Keys of another password fail.
        let other = ScramVerifier::from_password("eraser", b"salty-salt-salt!", 4096);
        let mut c = KeyedScram::new(
            ScramKeys {
                client_key: hmac_sha256(&salted("eraser", &other), &[b"Client Key"]),
                server_key: other.server_key,
            },
            "n,,",
            &[],
        );
        let ex = Exchange::new(&v, ClientFirst::parse(&c.client_first("n,,")).unwrap());
        let fin = c.client_final(ex.server_first().as_bytes()).unwrap();
        assert!(ex.finish(&fin, true).unwrap().is_none());
    }

    fn salted(password: &str, v: &ScramVerifier) -> [u8; 32] {
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password.as_bytes(), &v.salt, v.iterations, &mut out);
        out
    }

    #[test]
    fn server_nonce_must_extend_ours() {
        let keys = ScramKeys {
            client_key: [1; 32],
            server_key: [2; 32],
        };
        let mut c = KeyedScram::new(keys, "n,,", &[]);
        assert!(c.client_final(b"r=someone-else,s=AAAA,i=4096").is_err());
        let own = c.client_nonce.clone();
        assert!(c
            .client_final(format!("r={own},s=AAAA,i=4096").as_bytes())
            .is_err());
    }
}
