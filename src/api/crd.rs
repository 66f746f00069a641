//! The CustomResourceDefinition, generated from the Rust types. `crds/nixosnodes.yaml` is the
//! committed copy of [`crd_yaml`]; a test fails when they differ.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use super::{FlakeSource, NixOSNode, NixOSPool};

/// The string formats kube-apiserver recognises in a CRD schema (the list of the apiextensions
/// `JSONSchemaProps.format` reference, plus `date-time`); any other format draws a
/// `Warning: unrecognized format` on every apply.
const KNOWN_STRING_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
];

/// The number formats Kubernetes knows.
const KNOWN_NUMBER_FORMATS: &[&str] = &["float", "double"];

/// The CRD object.
pub fn crd() -> CustomResourceDefinition {
    with_kubernetes_formats(NixOSNode::crd())
}

/// The FlakeSource CRD object.
pub fn flakesource_crd() -> CustomResourceDefinition {
    with_kubernetes_formats(FlakeSource::crd())
}

/// The NixOSPool CRD object.
pub fn nixospool_crd() -> CustomResourceDefinition {
    with_kubernetes_formats(NixOSPool::crd())
}

fn with_kubernetes_formats(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for v in &mut crd.spec.versions {
        if let Some(s) = v.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            kubernetes_formats(s);
        }
    }
    crd
}

/// A doc comment as one paragraph per paragraph: the line breaks of the source's wrapping
/// become spaces (kubectl explain wraps by itself; kept, they cut sentences in the middle),
/// blank lines between paragraphs stay.
pub(crate) fn unwrap_description(text: &str) -> String {
    text.trim()
        .split("\n\n")
        .map(|paragraph| paragraph.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Map the formats schemars derives from Rust types onto the ones Kubernetes knows: unsigned
/// and narrow integers become `int32` (when every value fits) or `int64` (their `minimum: 0`
/// stays), `float`/`double` stay, and any other format is dropped (the type alone remains).
///
/// Descriptions are unwrapped on the way ([`unwrap_description`]).
fn kubernetes_formats(s: &mut JSONSchemaProps) {
    if let Some(d) = s.description.as_mut() {
        *d = unwrap_description(d);
    }
    if let Some(f) = s.format.take() {
        s.format = match s.type_.as_deref() {
            Some("integer") => match f.as_str() {
                "int32" | "int64" => Some(f),
                "int8" | "int16" | "uint8" | "uint16" => Some("int32".to_owned()),
                _ => Some("int64".to_owned()),
            },
            Some("number") => KNOWN_NUMBER_FORMATS.contains(&f.as_str()).then_some(f),
            Some("string") => KNOWN_STRING_FORMATS.contains(&f.as_str()).then_some(f),
            _ => None,
        };
    }
    for p in s.properties.iter_mut().flat_map(|m| m.values_mut()) {
        kubernetes_formats(p);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(p)) = s.additional_properties.as_mut() {
        kubernetes_formats(p);
    }
    match s.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(p)) => kubernetes_formats(p),
        Some(JSONSchemaPropsOrArray::Schemas(ps)) => ps.iter_mut().for_each(kubernetes_formats),
        None => {}
    }
    for group in [&mut s.all_of, &mut s.any_of, &mut s.one_of] {
        group.iter_mut().flatten().for_each(kubernetes_formats);
    }
    if let Some(n) = s.not.as_mut() {
        kubernetes_formats(n);
    }
}

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    to_yaml(&crd())
}

fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    // Long one-line strings (CEL rules, messages) stay on one line; multi-line ones are
    // literal blocks.
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    serde_saphyr::to_string_with_options(crd, options)
}

/// The FlakeSource CRD as YAML, exactly as committed in `crds/flakesources.yaml`.
pub fn flakesource_crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    to_yaml(&flakesource_crd())
}

/// The NixOSPool CRD as YAML, exactly as committed in `crds/nixospools.yaml`.
pub fn nixospool_crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    to_yaml(&nixospool_crd())
}

/// Every CRD nixroll defines, as one YAML stream (`nixroll crd`).
pub fn all_crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    Ok(format!(
        "{}---\n{}---\n{}",
        crd_yaml()?,
        flakesource_crd_yaml()?,
        nixospool_crd_yaml()?
    ))
}
