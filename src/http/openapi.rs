//! The OpenAPI 3.1 document's shared parts: the SPEC §3 error shape, the error answers every
//! operation may give, and the two ways to present a key. The operations themselves are
//! described next to their handlers (`#[utoipa::path]`) and registered with `utoipa_axum`'s
//! `routes!`, so a route cannot exist without its description and the two cannot drift.

use std::collections::BTreeMap;

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

/// Every failure: `{"error": {"code": "snake_case", "message": "..."}}` (SPEC §3).
#[derive(ToSchema)]
#[allow(dead_code)] // Describes the JSON `ApiError` writes; never built as a value.
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_request`, `not_found`, `rate_limited`.
    pub code: String,
    /// What went wrong, for people; names the offending field.
    pub message: String,
}

/// The error answers any API operation may give: bad input, no or a wrong key, admin-only,
/// not found (also another tenant's object), a state conflict, limits, and an unavailable
/// provider. Listed once so each operation documents them the same way.
pub struct Errors;

impl IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            ("400", "Invalid request: the message names the field"),
            ("401", "Missing, unknown, revoked or expired key"),
            (
                "403",
                "Not allowed for this key (admin only), or a cross-site change",
            ),
            (
                "404",
                "No such object (another tenant's objects are not found either)",
            ),
            ("405", "Method not allowed on this route"),
            ("409", "The object's state does not allow this"),
            ("413", "Request body too large"),
            ("415", "Unsupported Content-Type"),
            ("429", "Rate limited; see Retry-After"),
            ("431", "Request headers too large"),
            ("502", "An upstream (ACME CA, provider) failed"),
            (
                "503",
                "A provider or engine is unavailable, or the server is draining",
            ),
        ]
        .into_iter()
        .map(|(code, what)| (code.to_string(), error_response(what)))
        .collect()
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ErrorBody::name(),
                ))))
                .build(),
        )
        .build()
        .into()
}

/// Keeps `ErrorBody` in the components even though it is referenced only from `Errors`.
fn error_schemas() -> Vec<(String, RefOr<utoipa::openapi::schema::Schema>)> {
    vec![
        (ErrorBody::name().into(), ErrorBody::schema()),
        (ErrorDetail::name().into(), ErrorDetail::schema()),
    ]
}

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (admin or tenant): `Authorization: Bearer vk_…`",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        for (name, schema) in error_schemas() {
            components.schemas.insert(name, schema);
        }
    }
}

/// The document's frame; `api::app` adds the operations from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "voicectl API",
        description = "The REST API of voicectl (SPEC §3, §7). Every request carries an API key; \
                       a tenant key sees only its own tenant. Errors have one shape, `ErrorBody`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "/api/v1")),
    security(("bearer" = []), ("api_key" = [])),
    modifiers(&Security)
)]
pub struct ApiDoc;
