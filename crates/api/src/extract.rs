//! Request extractors that answer in the API's error shape: unparsable JSON is 400
//! `malformed_request`; JSON of the wrong shape is 422 `invalid_field` naming the field.
//! Action routes accept an empty body without a Content-Type.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body; an empty body reads as `T::default()` when `T` allows it.
pub struct Body<T>(pub T);

/// A JSON body that must be present.
pub struct Json<T>(pub T);

use hefring_app::field_of;

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if !bytes.trim_ascii_start().starts_with(b"{") {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => Err(ApiError::invalid("body", "must be a JSON object")),
            Err(e) => Err(ApiError::Malformed(format!(
                "the body is not valid JSON: {e}"
            ))),
        };
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(value) => match de.end() {
            Ok(()) => Ok(value),
            Err(e) => Err(ApiError::Malformed(format!(
                "the body is not valid JSON: {e}"
            ))),
        },
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let message = inner.to_string();
                    let message = message
                        .split(" at line ")
                        .next()
                        .unwrap_or(&message)
                        .to_string();
                    Err(ApiError::invalid(&field_of(&message, &path), message))
                }
                _ => Err(ApiError::Malformed(format!(
                    "the body is not valid JSON: {inner}"
                ))),
            }
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::Malformed(e.to_string()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(T::default()));
        }
        parse(&bytes).map(Body)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::Malformed(e.to_string()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::Malformed("a JSON body is required".into()));
        }
        parse(&bytes).map(Json)
    }
}

/// Query parameters; a bad value is 422 naming the parameter.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(query));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|err| {
                let path = err.path().to_string();
                let message = err.into_inner().to_string();
                ApiError::invalid(&field_of(&message, &path), message)
            })
    }
}

fn form_urlencoded_parse(query: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        port: Option<u16>,
    }

    fn field(bytes: &str) -> String {
        match parse::<Sample>(bytes.as_bytes()).unwrap_err() {
            ApiError::Invalid(e) => e.field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shape_errors_name_the_field() {
        assert_eq!(field(r#"{}"#), "name");
        assert_eq!(field(r#"{"name": 1}"#), "name");
        assert_eq!(field(r#"{"name": "a", "port": 70000}"#), "port");
        assert_eq!(field(r#"{"name": "a", "bogus": 1}"#), "bogus");
        assert_eq!(field(r#"[]"#), "body");
    }

    #[test]
    fn syntax_errors_are_malformed() {
        for bad in ["{", "{\"name\": }", "nope", "{\"name\":\"a\"} trailing"] {
            assert!(
                matches!(parse::<Sample>(bad.as_bytes()), Err(ApiError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
