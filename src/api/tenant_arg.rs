//! Which tenant a request is about, for endpoints that both tenant keys and the admin key use
//! (tools, the do-not-call list, …): a tenant key always means its own tenant; the admin key
//! names one with `tenant`, which may be left out when there is exactly one.

use super::{ApiError, Auth};
use crate::http::AppState;
use crate::store::calls::Scope;
use crate::store::tenants;

/// Refuses a `tenant` named by anything but the admin key (a tenant key cannot reach another).
pub(super) fn check_tenant_field(auth: &Auth, tenant: &Option<String>) -> Result<(), ApiError> {
    if tenant.is_some() && !auth.is_admin() {
        return Err(ApiError::bad_request(
            "tenant",
            "only the admin key may name a tenant",
        ));
    }
    Ok(())
}

/// The tenant id the request is about.
pub(super) async fn tenant_of(
    s: &AppState,
    auth: &Auth,
    name: Option<String>,
) -> Result<i64, ApiError> {
    check_tenant_field(auth, &name)?;
    let scope = auth.scope();
    s.store()
        .read(move |c| {
            Ok(match (scope, name) {
                (Scope::Tenant(id), _) => Ok(id),
                (Scope::All, Some(n)) => Ok(tenants::get(c, &n)?.id),
                (Scope::All, None) => match tenants::list(c)?.as_slice() {
                    [only] => Ok(only.id),
                    _ => Err(ApiError::bad_request(
                        "tenant",
                        "required with the admin key (name the tenant)",
                    )),
                },
            })
        })
        .await?
}
