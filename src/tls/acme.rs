//! One ACME issuance with instant-acme 0.8.5: account (stored once, reused), order for every
//! configured name, HTTP-01 or TLS-ALPN-01, CSR, finalize, chain. Scheduling and retries are
//! the caller's (`super::Tls`); this module only does one attempt and says how it failed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use super::cert::{self, CertError, LoadedCert};
use super::resolver::CertResolver;
use super::storage::{StorageError, TlsStorage};
use crate::config::AcmeChallenge;

/// A whole attempt may not take longer than this (a CA that accepts connections and then
/// stalls must not hold the renewal loop forever).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{0}")]
    Config(String),
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("validation of {name} failed: {detail}")]
    Validation {
        name: String,
        detail: String,
        problem_type: Option<String>,
    },
    #[error("the CA gave no answer in time (order still {0})")]
    Stalled(String),
    #[error("the CA's certificate is unusable: {0}")]
    BadCertificate(#[from] CertError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// How the renewal loop should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Retrying unchanged cannot help (bad config, a name the CA refuses): wait long, say so.
    Permanent,
    /// The CA asked us to slow down.
    RateLimited,
    /// Network, CA hiccup, failed validation (DNS or port 80 may get fixed): back off.
    Temporary,
}

const PERMANENT_TYPES: &[&str] = &[
    "rejectedIdentifier",
    "unsupportedIdentifier",
    "caa",
    "malformed",
    "badCSR",
    "badSignatureAlgorithm",
    "externalAccountRequired",
    "invalidContact",
    "unsupportedContact",
    "userActionRequired",
    "badPublicKey",
];

fn problem_kind(problem_type: Option<&str>) -> FailureKind {
    let Some(t) = problem_type else {
        return FailureKind::Temporary;
    };
    let short = t.rsplit(':').next().unwrap_or(t);
    if short == "rateLimited" {
        FailureKind::RateLimited
    } else if PERMANENT_TYPES.contains(&short) {
        FailureKind::Permanent
    } else {
        FailureKind::Temporary
    }
}

impl AcmeError {
    pub fn kind(&self) -> FailureKind {
        match self {
            AcmeError::Config(_) => FailureKind::Permanent,
            AcmeError::Acme(instant_acme::Error::Api(p)) => {
                let own = problem_kind(p.r#type.as_deref());
                // A refused name shows up as a subproblem of an otherwise generic problem.
                p.subproblems
                    .iter()
                    .map(|s| problem_kind(s.r#type.as_deref()))
                    .fold(own, |acc, k| match (acc, k) {
                        (FailureKind::Permanent, _) | (_, FailureKind::Permanent) => {
                            FailureKind::Permanent
                        }
                        (FailureKind::RateLimited, _) | (_, FailureKind::RateLimited) => {
                            FailureKind::RateLimited
                        }
                        _ => FailureKind::Temporary,
                    })
            }
            AcmeError::Validation { problem_type, .. } => {
                match problem_kind(problem_type.as_deref()) {
                    // A CAA record or a refused name will not change by itself.
                    FailureKind::Permanent => FailureKind::Permanent,
                    _ => FailureKind::Temporary,
                }
            }
            _ => FailureKind::Temporary,
        }
    }

    /// The earliest retry the CA asked for (instant-acme surfaces `Retry-After` of a polled
    /// order as a timeout carrying the instant).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AcmeError::Acme(instant_acme::Error::Timeout(Some(at))) => {
                Some(at.saturating_duration_since(std::time::Instant::now()))
            }
            _ => None,
        }
    }
}

/// Everything one attempt needs.
pub struct Request<'a> {
    pub directory_url: &'a str,
    pub email: &'a str,
    pub root_ca: &'a str,
    pub challenge: AcmeChallenge,
    pub names: &'a [String],
    pub storage: &'a TlsStorage,
    /// HTTP-01 answers (token → key authorization), read by the port-80 listener.
    pub http_tokens: &'a RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01 answers are served by the HTTPS listener's resolver.
    pub resolver: &'a Arc<CertResolver>,
}

/// What a successful attempt produced; already stored on disk.
pub struct Issued {
    pub cert: LoadedCert,
}

/// Runs one issuance, bounded by [`ATTEMPT_TIMEOUT`]; challenge answers are withdrawn on
/// every path out.
pub async fn issue(req: &Request<'_>) -> Result<Issued, AcmeError> {
    let published = Published {
        req,
        tokens: Vec::new(),
        names: Vec::new(),
    };
    let mut published = published;
    match tokio::time::timeout(ATTEMPT_TIMEOUT, issue_inner(req, &mut published)).await {
        Ok(r) => r,
        Err(_) => Err(AcmeError::Stalled(format!(
            "unfinished after {} s",
            ATTEMPT_TIMEOUT.as_secs()
        ))),
    }
}

/// Challenge answers currently published; withdrawn on drop.
struct Published<'r, 'a> {
    req: &'r Request<'a>,
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Drop for Published<'_, '_> {
    fn drop(&mut self) {
        let mut map = self
            .req
            .http_tokens
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for t in &self.tokens {
            map.remove(t);
        }
        for n in &self.names {
            self.req.resolver.clear_challenge(n);
        }
    }
}

fn builder(root_ca: &str) -> Result<instant_acme::AccountBuilder, AcmeError> {
    if root_ca.is_empty() {
        Ok(Account::builder()?)
    } else {
        Account::builder_with_root(root_ca).map_err(|e| {
            AcmeError::Config(format!("tls.acme_root_ca {root_ca:?} is not usable: {e}"))
        })
    }
}

async fn account(req: &Request<'_>, fresh: bool) -> Result<Account, AcmeError> {
    if !fresh && let Some(creds) = req.storage.load_account()? {
        return Ok(builder(req.root_ca)?.from_credentials(creds).await?);
    }
    let contact = (!req.email.is_empty()).then(|| format!("mailto:{}", req.email));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder(req.root_ca)?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            req.directory_url.to_owned(),
            None,
        )
        .await?;
    req.storage.save_account(&creds)?;
    tracing::info!(directory = req.directory_url, "created ACME account");
    Ok(account)
}

fn is_unknown_account(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref().is_some_and(|t| t.ends_with("accountDoesNotExist") || t.ends_with("unauthorized")))
}

async fn issue_inner(
    req: &Request<'_>,
    published: &mut Published<'_, '_>,
) -> Result<Issued, AcmeError> {
    let identifiers: Vec<Identifier> = req.names.iter().cloned().map(Identifier::Dns).collect();
    let new_order = NewOrder::new(&identifiers);
    let mut acct = account(req, false).await?;
    let mut order = match acct.new_order(&new_order).await {
        Ok(o) => o,
        // The stored account is unknown to the CA (a test CA restarted, an account
        // deactivated): make a new one, once.
        Err(e) if is_unknown_account(&e) => {
            tracing::warn!(error = %e, "stored ACME account rejected; creating a new one");
            req.storage.drop_account();
            acct = account(req, true).await?;
            acct.new_order(&new_order).await?
        }
        Err(e) => return Err(e.into()),
    };

    let kind = match req.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authzs = order.authorizations();
    while let Some(a) = authzs.next().await {
        let mut a = a?;
        let name = a.identifier().to_string();
        match a.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(AcmeError::Validation {
                    name,
                    detail: format!("authorization is {other:?}"),
                    problem_type: None,
                });
            }
        }
        let mut ch = a.challenge(kind.clone()).ok_or_else(|| {
            AcmeError::Config(format!(
                "the CA offers no {kind:?} challenge for {name}; try the other tls.challenge"
            ))
        })?;
        let ka = ch.key_authorization();
        match req.challenge {
            AcmeChallenge::Http01 => {
                req.http_tokens
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(ch.token.clone(), ka.as_str().to_owned());
                published.tokens.push(ch.token.clone());
            }
            AcmeChallenge::TlsAlpn01 => {
                let key = cert::alpn_challenge(&name, ka.digest().as_ref())?;
                req.resolver.set_challenge(&name, key);
                published.names.push(name.clone());
            }
        }
        tracing::debug!(%name, challenge = ?kind, "challenge published");
        ch.set_ready().await?;
    }

    let status = order
        .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
        .await?;
    if status != OrderStatus::Ready {
        return Err(validation_error(&mut order).await);
    }
    let (csr, key_pem) = cert::csr(req.names)?;
    order.finalize_csr(&csr).await?;
    let chain_pem = order
        .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
        .await?;
    let loaded = cert::load_pem(chain_pem.as_bytes(), key_pem.as_bytes())?;
    if !loaded.info.covers(req.names) {
        return Err(AcmeError::BadCertificate(CertError::Parse(format!(
            "it names {:?}, not all of {:?}",
            loaded.info.names, req.names
        ))));
    }
    req.storage
        .save_cert(chain_pem.as_bytes(), key_pem.as_bytes())?;
    Ok(Issued { cert: loaded })
}

/// Why an order went invalid: the first failed challenge's problem, naming its host.
async fn validation_error(order: &mut instant_acme::Order) -> AcmeError {
    let mut authzs = order.authorizations();
    while let Some(Ok(a)) = authzs.next().await {
        if a.status == AuthorizationStatus::Valid {
            continue;
        }
        let name = a.identifier().to_string();
        if let Some(p) = a.challenges.iter().find_map(|c| c.error.clone()) {
            return AcmeError::Validation {
                name,
                detail: p.to_string(),
                problem_type: p.r#type.clone(),
            };
        }
    }
    AcmeError::Stalled("invalid, without a reason from the CA".into())
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(t: &str) -> AcmeError {
        let p: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": t, "detail": "x", "status": 400
        }))
        .unwrap();
        AcmeError::Acme(instant_acme::Error::Api(p))
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(
            api("urn:ietf:params:acme:error:rejectedIdentifier").kind(),
            FailureKind::Permanent
        );
        assert_eq!(
            api("urn:ietf:params:acme:error:rateLimited").kind(),
            FailureKind::RateLimited
        );
        assert_eq!(
            api("urn:ietf:params:acme:error:serverInternal").kind(),
            FailureKind::Temporary
        );
        assert_eq!(AcmeError::Config("x".into()).kind(), FailureKind::Permanent);
        let v = AcmeError::Validation {
            name: "a".into(),
            detail: "connection refused".into(),
            problem_type: Some("urn:ietf:params:acme:error:connection".into()),
        };
        assert_eq!(v.kind(), FailureKind::Temporary);
    }
}
