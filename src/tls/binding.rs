//! `tls-server-end-point` channel binding (RFC 5929 section 4.1): a hash of the server's
//! certificate with the hash of the certificate's own signature, except that MD5 and
//! SHA-1 become SHA-256.

use sha2::{Digest, Sha256, Sha384, Sha512};
use x509_cert::der::asn1::ObjectIdentifier as Oid;
use x509_cert::der::Decode;

const SHA384_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");
const ECDSA_WITH_SHA384: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_WITH_SHA512: Oid = Oid::new_unwrap("1.2.840.10045.4.3.4");

/// The binding data for a DER certificate, or why there is none.
pub fn tls_server_end_point(cert_der: &[u8]) -> Result<Vec<u8>, String> {
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| format!("cannot parse the server certificate: {e}"))?;
    let alg = cert.signature_algorithm.oid;
    Ok(if alg == SHA384_WITH_RSA || alg == ECDSA_WITH_SHA384 {
        Sha384::digest(cert_der).to_vec()
    } else if alg == SHA512_WITH_RSA || alg == ECDSA_WITH_SHA512 {
        Sha512::digest(cert_der).to_vec()
    } else {
        // SHA-256 signatures, and MD5/SHA-1 ones, which RFC 5929 maps to SHA-256.
        Sha256::digest(cert_der).to_vec()
    })
}
