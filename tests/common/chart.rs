//! charts/nixroll rendered without Helm (none can be installed here): every template goes
//! through `gtmpl`, a Go text/template engine, with the context Helm gives (`.Values` from
//! values.yaml merged with overrides like Helm merges them, `.Chart`, `.Release`), the named
//! templates of `templates/_*.tpl` (`define`, `template`, `include`) and the Helm/Sprig
//! functions the chart uses, written here after their definitions in Helm and Sprig: `toYaml`,
//! `nindent`, `indent`, `include`, `default`, `quote`, `required`, `fail`, `replace`, `trunc`,
//! `trimSuffix`. A template that calls anything else fails to parse.
//!
//! `render(overrides)` gives the objects of `helm template nixroll charts/nixroll -n
//! nixroll-system`, ready for a test to check or to apply to an API server.

use std::cell::RefCell;

use gtmpl::{Context, Func, FuncError, Template, Value as G};
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The chart's folder.
pub fn dir() -> String {
    format!("{ROOT}/charts/nixroll")
}

/// The release a render is for (`helm install NAME charts/nixroll --namespace NAMESPACE`).
#[derive(Clone, Debug)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Default for Release {
    fn default() -> Self {
        Release {
            name: "nixroll".into(),
            namespace: "nixroll-system".into(),
        }
    }
}

/// What `helm install` renders: the objects of `templates/*.yaml` and `NOTES.txt`.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub docs: Vec<Value>,
    pub notes: String,
}

/// YAML documents as JSON values, empty documents left out.
pub fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The chart's objects with values.yaml merged with `overrides`, released as `nixroll` in
/// `nixroll-system`; panics when the chart does not render.
pub fn render(overrides: Value) -> Vec<Value> {
    try_render(&Release::default(), overrides)
        .unwrap_or_else(|e| panic!("the chart does not render: {e}"))
        .docs
}

/// NOTES.txt as `helm install` prints it.
pub fn notes(overrides: Value) -> String {
    try_render(&Release::default(), overrides)
        .unwrap_or_else(|e| panic!("the chart does not render: {e}"))
        .notes
}

/// values.yaml merged with `overrides` (what the templates see as `.Values`).
pub fn values(overrides: &Value) -> Value {
    let mut values: Value = serde_saphyr::from_str(&read(&format!("{}/values.yaml", dir()))).unwrap();
    merge(&mut values, overrides);
    values
}

/// Render every template for `release`; `Err` carries the message of a failed render (a
/// template's `fail` or `required`, an unknown function, a value that is not set).
pub fn try_render(release: &Release, overrides: Value) -> Result<Rendered, String> {
    let dir = dir();
    let chart: Value = serde_saphyr::from_str(&read(&format!("{dir}/Chart.yaml"))).unwrap();
    let context = json!({
        "Values": values(&overrides),
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
        "Release": {"Name": release.name, "Namespace": release.namespace, "Service": "Helm"},
    });
    let mut files: Vec<_> = std::fs::read_dir(format!("{dir}/templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let helpers: String = files
        .iter()
        .filter(|f| {
            let name = f.file_name().unwrap().to_string_lossy();
            name.starts_with('_') && name.ends_with(".tpl")
        })
        .map(|f| read(&f.to_string_lossy()))
        .collect::<Vec<_>>()
        .join("\n");
    HELPERS.with(|h| *h.borrow_mut() = helpers);
    let context = to_g(&context);
    let mut docs = Vec::new();
    let mut notes = String::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('_') {
            continue;
        }
        let out = execute(&read(&file.to_string_lossy()), &context).map_err(|e| format!("{name}: {e}"))?;
        if out.contains("<no value>") {
            return Err(format!("{name} used a value that is not set:\n{out}"));
        }
        if name == "NOTES.txt" {
            notes = out;
        } else if name.ends_with(".yaml") {
            docs.extend(yaml_docs(&out));
        } else {
            return Err(format!(
                "{name}: Helm renders only *.yaml, *.tpl and NOTES.txt here"
            ));
        }
    }
    Ok(Rendered { docs, notes })
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

thread_local! {
    /// The named templates (`_*.tpl`) of the chart being rendered, for `include`: gtmpl's
    /// functions are plain `fn`s without access to the template set.
    static HELPERS: RefCell<String> = const { RefCell::new(String::new()) };
}

const FUNCS: &[(&str, Func)] = &[
    ("toYaml", to_yaml),
    ("nindent", nindent),
    ("indent", indent),
    ("include", include),
    ("default", default),
    ("quote", quote),
    ("required", required),
    ("fail", fail),
    ("replace", replace),
    ("trunc", trunc),
    ("trimSuffix", trim_suffix),
];

/// `text` rendered with the chart's named templates and `dot` as `.` and `$`.
fn execute(text: &str, dot: &G) -> Result<String, String> {
    let mut t = Template::default();
    t.add_funcs(FUNCS);
    let helpers = HELPERS.with(|h| h.borrow().clone());
    t.add_template("_helpers", helpers).map_err(|e| e.to_string())?;
    t.parse(text).map_err(|e| e.to_string())?;
    t.render(&Context::from(dot.clone())).map_err(|e| e.to_string())
}

fn to_g(v: &Value) -> G {
    match v {
        Value::Null => G::Nil,
        Value::Bool(b) => G::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => G::from(i),
            None => G::from(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => G::String(s.clone()),
        Value::Array(a) => G::Array(a.iter().map(to_g).collect()),
        Value::Object(o) => G::Map(o.iter().map(|(k, v)| (k.clone(), to_g(v))).collect()),
    }
}

fn from_g(v: &G) -> Result<Value, FuncError> {
    Ok(match v {
        G::Nil | G::NoValue => Value::Null,
        G::Bool(b) => json!(b),
        G::String(s) => json!(s),
        G::Number(n) => match n.as_i64() {
            Some(i) => json!(i),
            None => json!(n.as_f64()),
        },
        G::Array(a) => Value::Array(a.iter().map(from_g).collect::<Result<_, _>>()?),
        G::Map(m) | G::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), from_g(v)?)))
                .collect::<Result<_, FuncError>>()?,
        ),
        G::Function(_) => return Err(FuncError::Generic("a function is not a value".into())),
    })
}

/// Go's `fmt.Sprint` of a scalar.
fn sprint(v: &G) -> Result<String, FuncError> {
    Ok(match v {
        G::String(s) => s.clone(),
        G::Nil | G::NoValue => String::new(),
        other => match from_g(other)? {
            Value::String(s) => s,
            v => v.to_string(),
        },
    })
}

fn string_arg(f: &str, v: &G) -> Result<String, FuncError> {
    match v {
        G::String(s) => Ok(s.clone()),
        other => Err(FuncError::Generic(format!(
            "{f}: expected a string, got {other:?}"
        ))),
    }
}

fn count_arg(f: &str, v: &G) -> Result<usize, FuncError> {
    match v {
        G::Number(n) => n
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| FuncError::Generic(format!("{f}: expected a count, got {n:?}"))),
        other => Err(FuncError::Generic(format!(
            "{f}: expected a count, got {other:?}"
        ))),
    }
}

/// Sprig's `empty`: nil, false, 0, "" and empty lists and maps.
fn is_empty(v: &G) -> bool {
    match v {
        G::Nil | G::NoValue => true,
        G::Bool(b) => !b,
        G::String(s) => s.is_empty(),
        G::Number(n) => n.as_f64() == Some(0.0),
        G::Array(a) => a.is_empty(),
        G::Map(m) | G::Object(m) => m.is_empty(),
        G::Function(_) => false,
    }
}

/// Helm: `toYaml` marshals to YAML (keys sorted) and trims the trailing newline.
fn to_yaml(args: &[G]) -> Result<G, FuncError> {
    let [v] = args else {
        return Err(FuncError::ExactlyXArgs("toYaml".into(), 1));
    };
    let text = serde_saphyr::to_string(&from_g(v)?).map_err(|e| FuncError::Generic(e.to_string()))?;
    Ok(G::String(text.trim_end_matches('\n').to_string()))
}

/// Sprig: `indent N s` prefixes every line of s with N spaces.
fn indent(args: &[G]) -> Result<G, FuncError> {
    let [n, s] = args else {
        return Err(FuncError::ExactlyXArgs("indent".into(), 2));
    };
    let pad = " ".repeat(count_arg("indent", n)?);
    let s = string_arg("indent", s)?;
    Ok(G::String(format!(
        "{pad}{}",
        s.replace('\n', &format!("\n{pad}"))
    )))
}

/// Sprig: `nindent N s` = "\n" + `indent N s`.
fn nindent(args: &[G]) -> Result<G, FuncError> {
    let G::String(s) = indent(args)? else {
        return Err(FuncError::Generic("nindent".into()));
    };
    Ok(G::String(format!("\n{s}")))
}

/// Helm: `include NAME DOT` renders the named template to a string (for pipelines).
fn include(args: &[G]) -> Result<G, FuncError> {
    let [name, dot] = args else {
        return Err(FuncError::ExactlyXArgs("include".into(), 2));
    };
    let name = string_arg("include", name)?;
    let text = format!("{{{{- template {} . -}}}}", json!(name));
    execute(&text, dot)
        .map(G::String)
        .map_err(|e| FuncError::Generic(format!("include {name:?}: {e}")))
}

/// Sprig: `default D V` is V unless V is empty (`empty`), then D.
fn default(args: &[G]) -> Result<G, FuncError> {
    match args {
        [d] => Ok(d.clone()),
        [d, v] => Ok(if is_empty(v) { d.clone() } else { v.clone() }),
        _ => Err(FuncError::Generic(format!(
            "default takes 1 or 2 arguments, got {}",
            args.len()
        ))),
    }
}

/// Sprig: `quote a b…` double-quotes each non-nil argument (Go's %q), joined by spaces.
fn quote(args: &[G]) -> Result<G, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|a| !matches!(a, G::Nil | G::NoValue))
        .map(|a| Ok(json!(sprint(a)?).to_string()))
        .collect::<Result<_, FuncError>>()?;
    Ok(G::String(quoted.join(" ")))
}

/// Helm: `required MSG V` fails the render with MSG when V is nil or "".
fn required(args: &[G]) -> Result<G, FuncError> {
    let [msg, v] = args else {
        return Err(FuncError::ExactlyXArgs("required".into(), 2));
    };
    match v {
        G::Nil | G::NoValue => Err(FuncError::Generic(string_arg("required", msg)?)),
        G::String(s) if s.is_empty() => Err(FuncError::Generic(string_arg("required", msg)?)),
        v => Ok(v.clone()),
    }
}

/// Helm: `fail MSG` fails the render with MSG.
fn fail(args: &[G]) -> Result<G, FuncError> {
    let [msg] = args else {
        return Err(FuncError::ExactlyXArgs("fail".into(), 1));
    };
    Err(FuncError::Generic(string_arg("fail", msg)?))
}

/// Sprig: `replace OLD NEW s`.
fn replace(args: &[G]) -> Result<G, FuncError> {
    let [old, new, s] = args else {
        return Err(FuncError::ExactlyXArgs("replace".into(), 3));
    };
    Ok(G::String(sprint(s)?.replace(&sprint(old)?, &sprint(new)?)))
}

/// Sprig: `trunc N s` keeps the first N characters.
fn trunc(args: &[G]) -> Result<G, FuncError> {
    let [n, s] = args else {
        return Err(FuncError::ExactlyXArgs("trunc".into(), 2));
    };
    Ok(G::String(
        sprint(s)?.chars().take(count_arg("trunc", n)?).collect(),
    ))
}

/// Sprig: `trimSuffix SUFFIX s`.
fn trim_suffix(args: &[G]) -> Result<G, FuncError> {
    let [suffix, s] = args else {
        return Err(FuncError::ExactlyXArgs("trimSuffix".into(), 2));
    };
    let (suffix, s) = (sprint(suffix)?, sprint(s)?);
    Ok(G::String(s.strip_suffix(&suffix).unwrap_or(&s).to_string()))
}

/// Helm's coalescing of user values into the chart's: maps merge key by key, anything else
/// replaces, and `null` deletes the chart's default.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}
