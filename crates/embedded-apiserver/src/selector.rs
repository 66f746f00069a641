//! Label and field selectors, parsed from their query-string form (and label selectors from
//! `LabelSelector` objects as in PodDisruptionBudgets).

use serde_json::Value;

use super::error::StoreError;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
    /// Matches nothing (a nil selector in a PodDisruptionBudget).
    Nothing,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<LabelReq>,
}

/// Split at top-level commas (commas inside parentheses belong to `in (a,b)`).
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

fn bad(sel: &str, what: &str) -> StoreError {
    StoreError::BadRequest {
        message: format!("unable to parse requirement: {what} in selector {sel:?}"),
    }
}

impl LabelSelector {
    /// Parse `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
    pub fn parse(sel: &str) -> Result<LabelSelector, StoreError> {
        let mut reqs = Vec::new();
        for part in split_top(sel) {
            if let Some(key) = part.strip_prefix('!') {
                reqs.push(LabelReq::NotExists(key.trim().to_owned()));
            } else if let Some((k, v)) = part.split_once("!=") {
                reqs.push(LabelReq::NotEq(k.trim().to_owned(), v.trim().to_owned()));
            } else if let Some((k, v)) = part.split_once("==") {
                reqs.push(LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned()));
            } else if let Some((k, v)) = part.split_once('=') {
                reqs.push(LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned()));
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                let set = parse_set(rest).ok_or_else(|| bad(sel, "malformed set"))?;
                reqs.push(LabelReq::NotIn(k.trim().to_owned(), set));
            } else if let Some((k, rest)) = part.split_once(" in ") {
                let set = parse_set(rest).ok_or_else(|| bad(sel, "malformed set"))?;
                reqs.push(LabelReq::In(k.trim().to_owned(), set));
            } else if part.contains(['(', ')', '<', '>', ' ']) {
                return Err(bad(sel, "unsupported operator"));
            } else {
                reqs.push(LabelReq::Exists(part.to_owned()));
            }
        }
        Ok(LabelSelector { reqs })
    }

    /// From a `metav1.LabelSelector` object; `None`/null matches nothing (policy/v1 semantics
    /// for a PDB without selector), `{}` matches everything.
    pub fn from_object(sel: &Value) -> LabelSelector {
        let Some(obj) = sel.as_object() else {
            return LabelSelector {
                reqs: vec![LabelReq::Nothing],
            };
        };
        let mut reqs = Vec::new();
        if let Some(ml) = obj.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in ml {
                reqs.push(LabelReq::Eq(k.clone(), v.as_str().unwrap_or("").to_owned()));
            }
        }
        for e in obj
            .get("matchExpressions")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let key = e["key"].as_str().unwrap_or("").to_owned();
            let values: Vec<String> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            reqs.push(match e["operator"].as_str() {
                Some("In") => LabelReq::In(key, values),
                Some("NotIn") => LabelReq::NotIn(key, values),
                Some("Exists") => LabelReq::Exists(key),
                Some("DoesNotExist") => LabelReq::NotExists(key),
                _ => LabelReq::Nothing,
            });
        }
        LabelSelector { reqs }
    }

    /// Whether the selector has no requirement.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether an object's labels satisfy the selector.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"]["labels"].as_object();
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Nothing => false,
        })
    }
}

/// One requirement of a field selector.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldReq {
    /// Dotted field path, e.g. `spec.nodeName`.
    pub field: String,
    /// Required value.
    pub value: String,
    /// `!=` instead of `=`.
    pub negated: bool,
}

/// A parsed field selector. Any dotted path into the object is accepted (the real server
/// accepts a fixed set per kind; every field it accepts works here the same way).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector {
    /// The requirements, all of which must hold.
    pub reqs: Vec<FieldReq>,
}

/// The string value of a dotted field of an object ("" when absent), as field selectors see it.
pub fn field_value(obj: &Value, field: &str) -> String {
    let mut cur = obj;
    for part in field.split('.') {
        cur = &cur[part];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

impl FieldSelector {
    /// Parse `metadata.name=x,spec.nodeName!=y`.
    pub fn parse(sel: &str) -> Result<FieldSelector, StoreError> {
        let mut reqs = Vec::new();
        for part in split_top(sel) {
            let (field, value, negated) = if let Some((k, v)) = part.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, v, false)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, v, false)
            } else {
                return Err(StoreError::BadRequest {
                    message: format!("invalid selector: '{sel}'; can't understand '{part}'"),
                });
            };
            reqs.push(FieldReq {
                field: field.trim().to_owned(),
                value: value.trim().to_owned(),
                negated,
            });
        }
        Ok(FieldSelector { reqs })
    }

    /// Whether an object satisfies the selector.
    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs
            .iter()
            .all(|r| (field_value(obj, &r.field) == r.value) != r.negated)
    }

    /// The value of a positive equality requirement on `field`, if any (for watcher indexing).
    pub fn equality_on(&self, field: &str) -> Option<&str> {
        self.reqs
            .iter()
            .find(|r| r.field == field && !r.negated)
            .map(|r| r.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_operators() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}});
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing,app=web", true),
            ("missing notin (x)", true),
            ("app in (db)", false),
        ] {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches(&o), want, "{sel}");
        }
    }

    #[test]
    fn field_selector_matches_nested_fields() {
        let o =
            json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed").unwrap();
        assert!(s.matches(&o));
        assert!(!FieldSelector::parse("metadata.name=q").unwrap().matches(&o));
        assert_eq!(s.equality_on("spec.nodeName"), Some("n1"));
    }
}
