//! Connecting to PostgreSQL, over TLS when the URL asks for it.
//!
//! The URL is libpq's (`host=... sslmode=require sslrootcert=ca.pem` or
//! `postgres://...?sslmode=require&sslrootcert=ca.pem`). tokio-postgres does
//! not know libpq's certificate options, so they are taken out here:
//!
//! - `sslmode=require`, `verify-ca` or `verify-full`: TLS (rustls), the
//!   server's certificate always verified, its name included, against
//!   `sslrootcert` (PEM) or, without it, the Mozilla roots. That is stricter
//!   than libpq's `require`, which encrypts without verifying: an account
//!   core does not send balances to a server it cannot authenticate.
//! - `sslcert` + `sslkey` (PEM): a client certificate for the server.
//! - `disable`, `allow`, `prefer` or none: no TLS, as before.

use super::store::SnapshotError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_postgres::Client;

/// A parsed connection URL.
pub struct Database {
    config: tokio_postgres::Config,
    tls: Option<TlsFiles>,
}

struct TlsFiles {
    root: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
}

fn tls_error(what: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Tls(what.to_string())
}

impl Database {
    pub fn parse(url: &str) -> Result<Database, SnapshotError> {
        let (rest, options) = take_tls_options(url);
        let mut config: tokio_postgres::Config = rest.parse()?;
        let get = |key: &str| {
            options
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let tls = match get("sslmode").as_deref() {
            Some("require" | "verify-ca" | "verify-full") => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let client = match (get("sslcert"), get("sslkey")) {
                    (Some(cert), Some(key)) => Some((cert.into(), key.into())),
                    (None, None) => None,
                    _ => return Err(tls_error("sslcert and sslkey go together")),
                };
                Some(TlsFiles {
                    root: get("sslrootcert").map(Into::into),
                    client,
                })
            }
            Some("disable" | "allow" | "prefer") | None => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
            Some(other) => return Err(tls_error(format_args!("sslmode={other}: unknown"))),
        };
        if config.get_connect_timeout().is_none() {
            // A host that drops packets must not hold a snapshot (or start-up) forever.
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        Ok(Database { config, tls })
    }

    /// Connects; the connection runs on a task of the current runtime.
    pub async fn connect(&self) -> Result<Client, SnapshotError> {
        let client = match &self.tls {
            None => {
                let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(watch(connection));
                client
            }
            Some(files) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(files.client_config()?);
                let (client, connection) = self.config.connect(tls).await?;
                tokio::spawn(watch(connection));
                client
            }
        };
        Ok(client)
    }
}

async fn watch<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %e, "PostgreSQL connection closed");
    }
}

impl TlsFiles {
    fn client_config(&self) -> Result<rustls::ClientConfig, SnapshotError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.root {
            Some(path) => {
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| tls_error(format_args!("sslrootcert {}: {e}", path.display())))?
                {
                    let cert = cert.map_err(|e| {
                        tls_error(format_args!("sslrootcert {}: {e}", path.display()))
                    })?;
                    roots.add(cert).map_err(|e| {
                        tls_error(format_args!("sslrootcert {}: {e}", path.display()))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_root_certificates(roots);
        match &self.client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| tls_error(format_args!("sslcert {}: {e}", cert.display())))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| tls_error(format_args!("sslkey {}: {e}", key.display())))?;
                builder.with_client_auth_cert(certs, key).map_err(tls_error)
            }
        }
    }
}

/// The TLS options of libpq tokio-postgres refuses, taken out of `url`
/// (key=value form or URI query).
fn take_tls_options(url: &str) -> (String, Vec<(String, String)>) {
    const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];
    let mut taken = Vec::new();
    if let Some((base, query)) = url
        .split_once('?')
        .filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| match pair.split_once('=') {
                Some((k, v)) if KEYS.contains(&k) => {
                    taken.push((k.to_owned(), v.to_owned()));
                    false
                }
                _ => true,
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, taken);
    }
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if KEYS.contains(&k.trim()) => {
                taken.push((k.trim().to_owned(), v.trim_matches('\'').to_owned()));
                false
            }
            _ => true,
        })
        .collect();
    (kept.join(" "), taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_taken_out_of_both_url_forms() {
        let (rest, taken) = take_tls_options(
            "host=db port=5432 sslmode=verify-full sslrootcert=/etc/ca.pem user=a",
        );
        assert_eq!(rest, "host=db port=5432 user=a");
        assert_eq!(
            taken,
            [
                ("sslmode".into(), "verify-full".into()),
                ("sslrootcert".into(), "/etc/ca.pem".into())
            ]
        );
        let (rest, taken) = take_tls_options(
            "postgres://a@db/x?sslmode=require&application_name=s&sslcert=c&sslkey=k",
        );
        assert_eq!(rest, "postgres://a@db/x?application_name=s");
        assert_eq!(taken.len(), 3);
        let (rest, taken) = take_tls_options("postgresql://a@db/x?sslmode=disable");
        assert_eq!((rest.as_str(), taken.len()), ("postgresql://a@db/x", 1));
        assert!(Database::parse("host=db sslmode=sometimes").is_err());
        assert!(Database::parse("host=db sslmode=require sslcert=c").is_err());
        assert!(Database::parse("host=db sslmode=require")
            .unwrap()
            .tls
            .is_some());
        assert!(Database::parse("host=db").unwrap().tls.is_none());
    }
}
