//! Session-ticket keys shared by a fleet: a rustls [`ProducesTickets`]
//! whose keys come from the listener's `ticket_keys` file, so that a ticket
//! one berth instance issued resumes on every instance that reads the same
//! file.
//!
//! The file holds one or more keys of 80 bytes each, concatenated (what
//! `openssl rand 80` writes, the size of nginx's ticket keys). Each key is
//! laid out as:
//!
//! | bytes | what |
//! |---|---|
//! | 0..16 | the key's name: sent in clear at the front of every ticket it seals, so the receiving instance knows which key opens it |
//! | 16..80 | the secret: HKDF-SHA256 (salt `berth session ticket key`, no info) derives the 32-byte ChaCha20-Poly1305 key from it |
//!
//! A ticket is `name (16) | nonce (12, random) | ciphertext | tag (16)`,
//! with the name as additional authenticated data. The first key seals new
//! tickets; every key opens them, so rotation is prepending a new key to the
//! file (and reloading each instance) and dropping the last one later.
//!
//! Everything here is synchronous and holds no task; the ticketer lives in
//! the rustls server config of its listener (rebuilt, from the same file,
//! on every reload).

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// The size of one key in the file.
pub const KEY_BYTES: usize = 80;
/// The size of a key's name, at the front of each key and of each ticket.
const NAME_BYTES: usize = 16;
/// HKDF's salt: fixed, so every instance derives the same AEAD key.
const SALT: &[u8] = b"berth session ticket key";
/// How long a client may keep a ticket (TLS 1.3 allows up to 7 days).
/// Tickets are accepted for as long as their key is in the file; this is
/// the lifetime clients are told.
pub const TICKET_LIFETIME_SECS: u32 = 12 * 60 * 60;

#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("ticket key file holds {0} bytes; it must hold one or more keys of 80 random bytes each, concatenated")]
    Length(usize),
    #[error("cannot derive a ticket key")]
    Derive,
}

/// One key: its name and its AEAD key.
struct TicketKey {
    name: [u8; NAME_BYTES],
    key: LessSafeKey,
}

/// The ticket keys of one `ticket_keys` file.
pub struct SharedTicketer {
    /// The first seals, all open; never empty.
    keys: Vec<TicketKey>,
    rng: SystemRandom,
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: they are in every ticket anyway; never the secrets.
        f.debug_struct("SharedTicketer")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl SharedTicketer {
    /// The keys of a `ticket_keys` file's contents.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<SharedTicketer, TicketKeyError> {
        if bytes.is_empty() || bytes.len() % KEY_BYTES != 0 {
            return Err(TicketKeyError::Length(bytes.len()));
        }
        let keys = bytes
            .chunks_exact(KEY_BYTES)
            .map(|chunk| {
                let (name, secret) = chunk.split_at(NAME_BYTES);
                let mut key_bytes = [0u8; 32];
                Salt::new(HKDF_SHA256, SALT)
                    .extract(secret)
                    .expand(&[], &CHACHA20_POLY1305)
                    .and_then(|okm| okm.fill(&mut key_bytes[..CHACHA20_POLY1305.key_len()]))
                    .map_err(|_| TicketKeyError::Derive)?;
                let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key_bytes)
                    .map_err(|_| TicketKeyError::Derive)?;
                let mut n = [0u8; NAME_BYTES];
                n.copy_from_slice(name);
                Ok(TicketKey {
                    name: n,
                    key: LessSafeKey::new(unbound),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SharedTicketer {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// How many keys the file held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let tag_len = CHACHA20_POLY1305.tag_len();
        let mut out = Vec::with_capacity(NAME_BYTES + NONCE_LEN + plain.len() + tag_len);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME_BYTES + NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_BYTES);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name[..] == *name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key
            .key
            .open_in_place(nonce, Aad::from(&key.name), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Vec<u8> {
        (0..KEY_BYTES as u8)
            .map(|i| i.wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn a_ticket_opens_with_the_same_file_and_not_with_another() {
        let a = SharedTicketer::from_file_bytes(&key(1)).unwrap();
        let same = SharedTicketer::from_file_bytes(&key(1)).unwrap();
        let other = SharedTicketer::from_file_bytes(&key(2)).unwrap();
        let ticket = a.encrypt(b"session state").unwrap();
        assert_eq!(&ticket[..NAME_BYTES], &key(1)[..NAME_BYTES]);
        assert_eq!(same.decrypt(&ticket).unwrap(), b"session state");
        assert_eq!(other.decrypt(&ticket), None);
        // Two tickets of the same state differ (random nonces).
        assert_ne!(a.encrypt(b"session state").unwrap(), ticket);
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_every_key() {
        let old = SharedTicketer::from_file_bytes(&key(1)).unwrap();
        let old_ticket = old.encrypt(b"old").unwrap();
        let rotated = SharedTicketer::from_file_bytes(&[key(2), key(1)].concat()).unwrap();
        assert_eq!(rotated.len(), 2);
        assert_eq!(rotated.decrypt(&old_ticket).unwrap(), b"old");
        let new_ticket = rotated.encrypt(b"new").unwrap();
        assert_eq!(&new_ticket[..NAME_BYTES], &key(2)[..NAME_BYTES]);
        assert_eq!(old.decrypt(&new_ticket), None);
    }

    #[test]
    fn a_tampered_or_short_ticket_is_refused() {
        let t = SharedTicketer::from_file_bytes(&key(1)).unwrap();
        let mut ticket = t.encrypt(b"state").unwrap();
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.decrypt(&ticket[..20]), None);
        assert_eq!(t.decrypt(&[]), None);
    }

    #[test]
    fn only_whole_keys_are_accepted() {
        for len in [0, 1, 79, 81, 159] {
            assert!(matches!(
                SharedTicketer::from_file_bytes(&vec![7u8; len]),
                Err(TicketKeyError::Length(n)) if n == len
            ));
        }
        assert_eq!(
            SharedTicketer::from_file_bytes(&[3u8; 240]).unwrap().len(),
            3
        );
    }
}
