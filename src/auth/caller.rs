//! Who is calling: the one identity type every surface uses. HTTP extracts it from the
//! `Authorization` header, a WebSocket from its first message (browsers cannot set headers
//! on one), both through [`AuthService::resolve`]; domains take `&Caller` and derive what they
//! need from it — the rules' `auth` variable, the actor recorded in the audit log and on
//! change-stream events, whether rules apply at all.

use super::tokens::{AdminClaims, TokenError, UserClaims, VerifiedToken};
use super::AuthService;
use crate::error::{ApiError, ApiResult};
use crate::rules::AuthInfo;
pub use crate::store::Actor;

#[derive(Debug, Clone)]
pub enum Caller {
    /// No credential.
    Anonymous,
    /// A signed-in user (anonymous users included), from a verified access token.
    User(UserClaims),
    /// An admin, from a verified admin token: rules do not apply.
    Admin(AdminClaims),
    /// A service key (your own back-end code): rules do not apply.
    ServiceKey { id: String, name: String },
    /// The server itself or its command line (`basalt admin create`, background work).
    System(&'static str),
}

impl Caller {
    /// Admins, service keys and the system bypass rules.
    pub fn is_privileged(&self) -> bool {
        matches!(
            self,
            Caller::Admin(_) | Caller::ServiceKey { .. } | Caller::System(_)
        )
    }

    pub fn actor(&self) -> Actor {
        match self {
            Caller::Anonymous => Actor {
                kind: "user",
                id: String::new(),
            },
            Caller::User(c) => Actor {
                kind: "user",
                id: c.sub.clone(),
            },
            Caller::Admin(c) => Actor {
                kind: "admin",
                id: c.sub.clone(),
            },
            Caller::ServiceKey { id, .. } => Actor {
                kind: "service",
                id: id.clone(),
            },
            Caller::System(name) => Actor {
                kind: "system",
                id: (*name).to_string(),
            },
        }
    }

    /// The rules' `auth` variable: `None` (CEL `null`) unless a user is signed in.
    pub fn rule_auth(&self) -> Option<AuthInfo> {
        match self {
            Caller::User(c) => Some(AuthInfo {
                uid: c.sub.clone(),
                role: c.role.clone(),
                email: c.email.clone(),
                email_verified: c.email_verified,
                is_anonymous: c.is_anonymous,
                claims: c.claims.clone(),
            }),
            _ => None,
        }
    }
}

impl AuthService {
    /// The caller behind a bearer credential (`None`: no credential). A credential that is
    /// present but not valid is an error (401), never silently anonymous.
    pub async fn resolve(&self, bearer: Option<&str>) -> ApiResult<Caller> {
        let Some(token) = bearer else {
            return Ok(Caller::Anonymous);
        };
        if AuthService::is_service_key(token) {
            let key = self
                .verify_service_key(token)
                .await?
                .ok_or_else(|| ApiError::Unauthenticated("unknown service key".into()))?;
            return Ok(Caller::ServiceKey {
                id: key.id,
                name: key.name,
            });
        }
        match self.tokens.verify(token).await {
            Ok(VerifiedToken::User(claims)) => Ok(Caller::User(claims)),
            Ok(VerifiedToken::Admin(claims)) => Ok(Caller::Admin(claims)),
            Err(TokenError::Expired) => {
                Err(ApiError::Unauthenticated("the token has expired".into()))
            }
            Err(err) => Err(ApiError::Unauthenticated(err.to_string())),
        }
    }
}
