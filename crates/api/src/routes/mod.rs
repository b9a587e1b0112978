//! Routes, grouped by entity. Each handler carries its OpenAPI description.

mod backups;
mod environments;
mod operations;
mod projects;
mod releases;
mod schedules;
mod system;
mod targets;

use std::sync::Arc;

use axum::middleware;
use axum::Router;
use hefring_store::Page;
use hefring_wire::PageQuery;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::require_token;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Hefring", description = "The Hefring hosting control plane API."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn protected() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(targets::list, targets::create))
        .routes(routes!(targets::show, targets::delete))
        .routes(routes!(targets::verify))
        .routes(routes!(projects::list, projects::create))
        .routes(routes!(projects::show))
        .routes(routes!(projects::verify))
        .routes(routes!(projects::deploy_key))
        .routes(routes!(releases::build))
        .routes(routes!(releases::list))
        .routes(routes!(releases::show))
        .routes(routes!(releases::fleet_update))
        .routes(routes!(environments::list, environments::create))
        .routes(routes!(environments::show, environments::delete))
        .routes(routes!(environments::deploy))
        .routes(routes!(environments::update))
        .routes(routes!(environments::verify))
        .routes(routes!(environments::disable))
        .routes(routes!(environments::enable))
        .routes(routes!(environments::login_link))
        .routes(routes!(backups::backup))
        .routes(routes!(backups::restore))
        .routes(routes!(backups::clone))
        .routes(routes!(backups::sync))
        .routes(routes!(backups::migrate))
        .routes(routes!(backups::list))
        .routes(routes!(backups::show, backups::delete))
        .routes(routes!(backups::download))
        .routes(routes!(schedules::show, schedules::set))
        .routes(routes!(schedules::tick))
        .routes(routes!(operations::list))
        .routes(routes!(operations::show))
        .routes(routes!(operations::log))
        .routes(routes!(operations::retry))
        .routes(routes!(operations::cancel))
        .routes(routes!(system::ssh_key))
        .routes(routes!(system::ca_certificate))
}

fn public() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(system::health))
}

pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let (_, protected_doc) = protected().split_for_parts();
    let (_, public_doc) = public().split_for_parts();
    doc.merge(protected_doc);
    doc.merge(public_doc);
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

pub fn router(state: AppState) -> Router {
    let (protected, _) = protected().split_for_parts();
    let (public, _) = public().split_for_parts();
    let doc = Arc::new(openapi());
    let protected = protected.layer(middleware::from_fn_with_state(state.clone(), require_token));
    public
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .merge(protected)
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

/// The store's page for a list query: at most 500 items, 50 by default.
pub fn page(query: &PageQuery) -> ApiResult<Page> {
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(ApiError::invalid("limit", "must be between 1 and 500"));
    }
    Ok(Page {
        limit,
        cursor: query.cursor.clone(),
    })
}
