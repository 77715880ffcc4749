//! The OTLP/HTTP endpoint of `[telemetry]`: the traces URL it names.

/// `url`'s parse error, which reqwest does not re-export by name.
type UrlParseError = <reqwest::Url as std::str::FromStr>::Err;

/// Why `telemetry.otlp_endpoint` is not an endpoint dualsync can export to.
#[derive(Debug, thiserror::Error)]
pub enum EndpointUrlError {
    #[error(transparent)]
    Unparsable(UrlParseError),
    #[error("needs http:// or https:// and a host")]
    NotHttp,
}

/// The traces URL of an OTLP/HTTP endpoint: a base URL (no path) gets `/v1/traces`, as the
/// OpenTelemetry exporter specification does for `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn traces_url(endpoint: &str) -> Result<String, EndpointUrlError> {
    let url = reqwest::Url::parse(endpoint).map_err(EndpointUrlError::Unparsable)?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(EndpointUrlError::NotHttp);
    }
    Ok(match url.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_string(),
    })
}
