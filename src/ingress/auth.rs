//! Callers and roles (design 4.4). `--auth-tokens FILE` lists one caller per
//! line, `<name> <role> <sha256 of the token, hex>`; a call carries
//! `authorization: Bearer <token>`. No or unknown token: `UNAUTHENTICATED`;
//! a role that may not call the RPC: `PERMISSION_DENIED`. Either way the call
//! stops before validation, so nothing is journaled. The file holds hashes
//! only, and a token never reaches a log or a metric: the caller's name does.
//!
//! Roles: `order` — AccountService (Reserve, Unreserve and the reads);
//! `admin` — AdminService and the reads; `read` — GetAccount, GetReservation;
//! `replica` — the raft port alone (replicas of one group, design 7), which
//! no other role reaches.
//! Health and reflection are not behind this (they are separate services).

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// What an RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reserve, Unreserve (and their batches and streams).
    Order,
    /// AdminService.
    Admin,
    /// GetAccount, GetReservation.
    Read,
    /// The raft port: replication between replicas.
    Replica,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Order,
    Admin,
    Read,
    Replica,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "order" => Some(Role::Order),
            "admin" => Some(Role::Admin),
            "read" => Some(Role::Read),
            "replica" => Some(Role::Replica),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Order => "order",
            Role::Admin => "admin",
            Role::Read => "read",
            Role::Replica => "replica",
        }
    }

    pub fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Role::Order | Role::Admin | Role::Read, Access::Read)
                | (Role::Order, Access::Order)
                | (Role::Admin, Access::Admin)
                | (Role::Replica, Access::Replica)
        )
    }
}

#[derive(Clone, Debug)]
struct Caller {
    name: &'static str,
    role: Role,
}

/// The name the metrics and logs use when no tokens file is configured.
pub const ANONYMOUS: &str = "anonymous";

/// Longest caller name accepted in the tokens file (it becomes a metric label).
const NAME_LEN_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}:{line}: {reason} (expected `<name> <order|admin|read> <sha256 hex of the token>`)"
    )]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{0}: no callers")]
    Empty(String),
}

/// The callers of a tokens file, by the hash of their token.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Caller>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: shown.clone(),
            source,
        })?;
        let tokens = Tokens::parse(&text, &shown)?;
        if tokens.by_hash.is_empty() {
            return Err(TokensError::Empty(shown));
        }
        Ok(tokens)
    }

    fn parse(text: &str, path: &str) -> Result<Tokens, TokensError> {
        let mut by_hash = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| TokensError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason: reason.to_owned(),
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, hash] = fields[..] else {
                return Err(bad("three fields"));
            };
            if name.len() > NAME_LEN_MAX || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("a name of at most 64 printable ASCII characters"));
            }
            let role = Role::parse(role).ok_or_else(|| bad("unknown role"))?;
            let hash = parse_hex(hash).ok_or_else(|| bad("a sha256 of 64 hex digits"))?;
            let caller = Caller {
                // Loaded once per process: a `'static` name is a metric label with
                // no allocation per call.
                name: Box::leak(name.to_owned().into_boxed_str()),
                role,
            };
            if by_hash.insert(hash, caller).is_some() {
                return Err(bad("the same token as an earlier line"));
            }
        }
        Ok(Tokens { by_hash })
    }
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Why a call was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No, a malformed or an unknown token: `UNAUTHENTICATED`.
    Unauthenticated(&'static str),
    /// A known caller whose role does not reach the RPC: `PERMISSION_DENIED`.
    PermissionDenied(String),
}

impl From<Denied> for Status {
    fn from(d: Denied) -> Status {
        match d {
            Denied::Unauthenticated(why) => Status::unauthenticated(why),
            Denied::PermissionDenied(why) => Status::permission_denied(why),
        }
    }
}

impl Tokens {
    /// Every caller's name.
    pub fn callers(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.by_hash.values().map(|c| c.name)
    }
}

/// The check every RPC makes first.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tokens: Option<Arc<Tokens>>,
}

impl Auth {
    /// `None`: no tokens file; every caller is [`ANONYMOUS`] (the listener is
    /// loopback, or `--insecure-no-auth` said so).
    pub fn new(tokens: Option<Tokens>) -> Auth {
        Auth {
            tokens: tokens.map(Arc::new),
        }
    }

    /// The names calls can be authorized as.
    pub fn callers(&self) -> Vec<&'static str> {
        match &self.tokens {
            Some(tokens) => tokens.callers().collect(),
            None => vec![ANONYMOUS],
        }
    }

    /// The caller's name, if its token allows `access` to `rpc`.
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        rpc: &str,
        access: Access,
    ) -> Result<&'static str, Denied> {
        let Some(tokens) = &self.tokens else {
            return Ok(ANONYMOUS);
        };
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Unauthenticated(
                "missing or malformed `authorization: Bearer <token>`",
            ))?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let caller = tokens
            .by_hash
            .get(&hash)
            .ok_or(Denied::Unauthenticated("unknown token"))?;
        if !caller.role.allows(access) {
            tracing::debug!(caller = %caller.name, rpc, "permission denied");
            return Err(Denied::PermissionDenied(format!(
                "caller {} (role {}) may not call {rpc}",
                caller.name,
                caller.role.name()
            )));
        }
        Ok(caller.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_design_4_4_says() {
        use Access::*;
        assert!(
            Role::Order.allows(Order) && Role::Order.allows(Read) && !Role::Order.allows(Admin)
        );
        assert!(
            Role::Admin.allows(Admin) && Role::Admin.allows(Read) && !Role::Admin.allows(Order)
        );
        assert!(Role::Read.allows(Read) && !Role::Read.allows(Order) && !Role::Read.allows(Admin));
        // The raft port, and nothing else.
        assert!(
            Role::Replica.allows(Replica)
                && [Order, Admin, Read]
                    .iter()
                    .all(|&a| !Role::Replica.allows(a))
        );
        assert!([Role::Order, Role::Admin, Role::Read]
            .iter()
            .all(|r| !r.allows(Replica)));
    }

    #[test]
    fn a_bad_tokens_file_names_the_line() {
        let hash = "ab".repeat(32);
        for (text, reason) in [
            ("desk order".to_owned(), "three fields"),
            (format!("desk boss {hash}"), "unknown role"),
            ("desk order 12".to_owned(), "sha256"),
            (format!("a order {hash}\nb read {hash}"), "same token"),
        ] {
            let e = Tokens::parse(&text, "tokens").unwrap_err().to_string();
            assert!(e.contains("tokens:") && e.contains(reason), "{e}");
        }
        let ok = Tokens::parse(&format!("# callers\n\ndesk-1 order {hash}\n"), "t").unwrap();
        assert_eq!(ok.by_hash.len(), 1);
    }
}
