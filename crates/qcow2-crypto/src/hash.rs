//! The hash algorithms LUKS1 names in its header (`hash_spec`, ESSIV hash):
//! plain digests, PBKDF2-HMAC and the anti-forensic splitter built on them.

use crate::CryptoError;
use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// A supported hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// Parses a name as QEMU spells it ("sha256"); QEMU's other hashes
    /// (md5, ripemd160, sm3) and unknown names are unsupported.
    pub(crate) fn parse(name: &str) -> Result<HashAlg, CryptoError> {
        Ok(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => {
                return Err(CryptoError::Unsupported(format!(
                    "Hash algorithm '{name}' not supported"
                )))
            }
        })
    }

    /// The name as QEMU spells it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub(crate) fn len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub(crate) fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub(crate) fn pbkdf2(self, password: &[u8], salt: &[u8], iters: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iters, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iters, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iters, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iters, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iters, out),
        }
    }

    /// The AF "diffuse" step: `block` in digest-sized chunks (the last one
    /// possibly shorter), chunk `j` replaced by `hash(be32(j) || chunk)`
    /// truncated to the chunk's length.
    fn diffuse(self, block: &mut [u8]) {
        for (j, chunk) in block.chunks_mut(self.len()).enumerate() {
            // Blocks are key-sized (<= 64 bytes): the index fits in 32 bits.
            let iv = (j as u32).to_be_bytes();
            let h = self.digest(&[&iv, chunk]);
            let n = chunk.len();
            chunk.copy_from_slice(&h[..n]);
        }
    }

    /// AF merge: `material` is `stripes` blocks of `out.len()` bytes.
    pub(crate) fn af_merge(self, material: &[u8], out: &mut [u8]) {
        let n = out.len();
        let mut d = vec![0u8; n];
        let mut blocks = material.chunks_exact(n);
        let last = blocks.next_back().unwrap_or(&[]);
        for b in blocks {
            xor_into(&mut d, b);
            self.diffuse(&mut d);
        }
        out.copy_from_slice(&d);
        xor_into(out, last);
    }

    /// AF split of `key` into `stripes` blocks (random but the last).
    pub(crate) fn af_split(self, key: &[u8], stripes: usize) -> Result<Vec<u8>, CryptoError> {
        let n = key.len();
        let mut out = vec![0u8; n * stripes];
        let body = n * (stripes - 1);
        crate::random(&mut out[..body])?;
        let mut d = vec![0u8; n];
        for b in out[..body].chunks_exact(n) {
            xor_into(&mut d, b);
            self.diffuse(&mut d);
        }
        xor_into(&mut d, key);
        out[body..].copy_from_slice(&d);
        Ok(out)
    }
}

fn xor_into(acc: &mut [u8], x: &[u8]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a ^= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af_split_merge_round_trip_all_hashes() {
        for h in [
            HashAlg::Sha1,
            HashAlg::Sha224,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
        ] {
            for klen in [16usize, 32, 48, 64] {
                let key: Vec<u8> = (0..klen as u8).collect();
                let m = h.af_split(&key, 50).unwrap();
                let mut out = vec![0u8; klen];
                h.af_merge(&m, &mut out);
                assert_eq!(out, key, "{h:?} {klen}");
            }
        }
    }

    #[test]
    fn pbkdf2_sha1_rfc6070_vector() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        let want = [
            0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
            0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57,
        ];
        assert_eq!(out, want);
    }
}
