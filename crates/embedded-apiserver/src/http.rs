//! The HTTP face: path routing (`/api/v1/...`, `/apis/{group}/{version}/...`), content types,
//! `Status` error bodies, watch streaming (newline-delimited JSON over chunked encoding) and
//! Table output for kubectl.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Counters;
use super::discovery;
use super::error::StoreError;
use super::openapi;
use super::resources::{Gvr, ResourceInfo};
use super::store::{
    DeleteOptions, Deleted, FieldValidation, ListOptions, Patch, Store, Subresource, Warnings, WatchOptions,
    WriteOptions,
};
use super::table;
use super::watch::{Watch, WatchEvent};

/// Shared state of the HTTP handlers.
pub struct Srv {
    pub(crate) store: Store,
    pub(crate) counters: Counters,
    pub(crate) address: String,
    pub(crate) pages: std::sync::Mutex<VecDeque<Snapshot>>,
}

/// A list result being served page by page (`limit`/`continue`).
pub(crate) struct Snapshot {
    token: String,
    resource_version: u64,
    items: Arc<Vec<Arc<Value>>>,
}

/// Snapshots kept for `continue` tokens; older ones answer 410 Expired.
const MAX_SNAPSHOTS: usize = 64;

struct Page {
    items: Vec<Arc<Value>>,
    resource_version: u64,
    cont: Option<String>,
    remaining: usize,
}

/// Consistent pagination: the first page snapshots the matching objects (cheap: shared
/// pointers) and later pages are cut from that snapshot, as etcd serves them at the list's
/// resourceVersion.
fn page(
    srv: &Srv,
    q: &HashMap<String, String>,
    fetch: impl FnOnce() -> Result<super::store::ObjectList, StoreError>,
) -> Result<Page, StoreError> {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let cont = q.get("continue").filter(|c| !c.is_empty());
    let mut pages = srv.pages.lock().unwrap_or_else(|p| p.into_inner());
    let (token, items, rv, start) = match cont {
        Some(c) => {
            let (token, offset) = c.split_once('/').unwrap_or((c.as_str(), "0"));
            let snap = pages.iter().find(|s| s.token == token).ok_or_else(|| StoreError::Gone {
                message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
            })?;
            let start = offset.parse::<usize>().unwrap_or(0);
            (token.to_owned(), snap.items.clone(), snap.resource_version, start)
        }
        None => {
            drop(pages);
            let list = fetch()?;
            pages = srv.pages.lock().unwrap_or_else(|p| p.into_inner());
            (
                format!("{:016x}", fastrand::u64(..)),
                Arc::new(list.items),
                list.resource_version,
                0,
            )
        }
    };
    let start = start.min(items.len());
    let end = limit.map_or(items.len(), |l| (start + l).min(items.len()));
    let page_items = items[start..end].to_vec();
    let remaining = items.len() - end;
    let next = if remaining > 0 {
        if !pages.iter().any(|s| s.token == token) {
            pages.push_back(Snapshot {
                token: token.clone(),
                resource_version: rv,
                items: items.clone(),
            });
            while pages.len() > MAX_SNAPSHOTS {
                pages.pop_front();
            }
        }
        Some(format!("{token}/{end}"))
    } else {
        pages.retain(|s| s.token != token);
        None
    };
    Ok(Page {
        items: page_items,
        resource_version: rv,
        cont: next,
        remaining,
    })
}

fn json_response(code: u16, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &StoreError) -> Response {
    json_response(e.code(), &e.to_status())
}

/// A parsed resource path.
struct Target {
    info: Arc<ResourceInfo>,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn not_found(path: &str) -> StoreError {
    StoreError::UnknownResource {
        path: path.to_owned(),
    }
}

/// Route `/api/v1/...` or `/apis/g/v/...` to a resource target.
fn parse_target(
    store: &Store,
    group: &str,
    version: &str,
    rest: &[&str],
    path: &str,
) -> Result<Target, StoreError> {
    let find = |plural: &str| store.resource(&Gvr::new(group, version, plural));
    // Namespaced: namespaces/{ns}/{plural}[/{name}[/{sub}]]
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && let Ok(info) = find(rest[2])
        && info.namespaced
    {
        return Ok(Target {
            info,
            ns: Some(rest[1].to_owned()),
            name: rest.get(3).map(|s| (*s).to_owned()),
            sub: rest.get(4).map(|s| (*s).to_owned()),
        });
    }
    let Some(plural) = rest.first() else {
        return Err(not_found(path));
    };
    let info = find(plural).map_err(|_| not_found(path))?;
    if rest.len() > 3 {
        return Err(not_found(path));
    }
    Ok(Target {
        info,
        ns: None,
        name: rest.get(1).map(|s| (*s).to_owned()),
        sub: rest.get(2).map(|s| (*s).to_owned()),
    })
}

/// What the client asked to receive (`Accept`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The objects.
    Full,
    /// `as=Table` (kubectl).
    Table,
    /// `as=PartialObjectMetadata[List]` (kube's metadata watchers).
    Meta,
}

fn shape(headers: &HeaderMap) -> Shape {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The first acceptable form wins, as the client lists its preference first.
    let first = accept.split(',').next().unwrap_or("");
    if first.contains("as=Table") {
        Shape::Table
    } else if first.contains("as=PartialObjectMetadata") {
        Shape::Meta
    } else {
        Shape::Full
    }
}

fn partial(o: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, StoreError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if body.starts_with(b"k8s\0") {
        return super::protobuf::decode(body);
    }
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(je) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if ct.contains("yaml") {
                serde_saphyr::from_slice(body).map_err(|e| StoreError::BadRequest {
                    message: format!("error decoding YAML: {e}"),
                })
            } else {
                Err(StoreError::BadRequest {
                    message: format!("error decoding JSON body: {je}"),
                })
            }
        }
    }
}

fn bool_param(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k).is_some_and(|v| v == "true" || v == "1")
}

/// The single handler behind every path.
pub async fn handle(
    State(srv): State<Arc<Srv>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let warnings = Warnings::default();
    let mut r = match route(&srv, &method, &path, &headers, &q, &body, &warnings) {
        Ok(Routed::Response(r)) => r,
        Ok(Routed::Watch(w, target, shape)) => return watch_response(&srv, w, target, shape, &q),
        Err(e) => error_response(&e),
    };
    for w in warnings.take() {
        if let Ok(v) = header::HeaderValue::from_str(&warning_header(&w)) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
}

/// A `Warning` header value as kube-apiserver writes it: code 299, no agent, quoted text.
fn warning_header(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(if c.is_control() { ' ' } else { c });
    }
    format!("299 - \"{quoted}\"")
}

enum Routed {
    Response(Response),
    Watch(Watch, Arc<ResourceInfo>, Shape),
}

fn ok(v: &Value) -> Result<Routed, StoreError> {
    Ok(Routed::Response(json_response(200, v)))
}

fn route(
    srv: &Srv,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    body: &[u8],
    warnings: &Warnings,
) -> Result<Routed, StoreError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let resources = srv.store.resources();
    match segs.as_slice() {
        ["version"] => return ok(&discovery::version()),
        ["healthz"] | ["readyz"] | ["livez"] => {
            return Ok(Routed::Response(Response::new(Body::from("ok"))));
        }
        ["api"] => return ok(&discovery::core_versions(&srv.address)),
        ["apis"] => return ok(&discovery::group_list(&resources)),
        ["api", v] => {
            return discovery::resource_list(&resources, "", v)
                .map_or_else(|| Err(not_found(path)), |d| ok(&d));
        }
        ["apis", g] => {
            return discovery::group(&resources, g).map_or_else(|| Err(not_found(path)), |d| ok(&d));
        }
        ["apis", g, v] => {
            return discovery::resource_list(&resources, g, v)
                .map_or_else(|| Err(not_found(path)), |d| ok(&d));
        }
        ["openapi", "v3"] => return ok(&openapi::v3_root(&resources)),
        ["openapi", "v3", "api", v] => {
            return openapi::v3_gv(&resources, "", v).map_or_else(|| Err(not_found(path)), |d| ok(&d));
        }
        ["openapi", "v3", "apis", g, v] => {
            return openapi::v3_gv(&resources, g, v).map_or_else(|| Err(not_found(path)), |d| ok(&d));
        }
        _ => {}
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found(path)),
    };
    let t = parse_target(&srv.store, group, version, rest, path)?;
    resource_request(srv, method, t, headers, q, body, warnings)
}

fn resource_request(
    srv: &Srv,
    method: &Method,
    t: Target,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    body: &[u8],
    warnings: &Warnings,
) -> Result<Routed, StoreError> {
    let store = &srv.store;
    let info = t.info.clone();
    let gvr = &info.gvr;
    let ns = t.ns.as_deref();
    let resource = match &t.sub {
        Some(s) => format!("{}/{s}", gvr.group_resource()),
        None => gvr.group_resource(),
    };
    let sub = match t.sub.as_deref() {
        None => Subresource::Main,
        Some("status") if info.status_subresource => Subresource::Status,
        Some("eviction") if gvr.plural == "pods" && gvr.group.is_empty() => Subresource::Main,
        Some(_) => return Err(not_found(&resource.to_string())),
    };
    let wopts = WriteOptions {
        field_manager: q.get("fieldManager").cloned().or_else(|| {
            headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .and_then(|ua| ua.split('/').next())
                .map(str::to_owned)
        }),
        force: bool_param(q, "force"),
        field_validation: FieldValidation::parse(q.get("fieldValidation").map(String::as_str))?,
        warnings: warnings.clone(),
    };
    if q.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return Err(StoreError::BadRequest {
            message: "dryRun is not supported by the embedded API server".into(),
        });
    }
    let list_opts = ListOptions {
        label_selector: q.get("labelSelector").cloned(),
        field_selector: q.get("fieldSelector").cloned(),
    };
    let shape = shape(headers);
    let table_mode = shape == Shape::Table;
    match (method, &t.name) {
        (&Method::GET, None) => {
            if bool_param(q, "watch") {
                srv.counters.bump("watch", &resource);
                let send_initial_events = q.get("sendInitialEvents").map(|v| v == "true" || v == "1");
                if send_initial_events == Some(true)
                    && q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan")
                {
                    return Err(StoreError::Invalid {
                        resource: gvr.group_resource(),
                        name: String::new(),
                        message: "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan".into(),
                        causes: Vec::new(),
                    });
                }
                let w = store.watch(
                    gvr,
                    ns,
                    &WatchOptions {
                        list: list_opts,
                        resource_version: q.get("resourceVersion").cloned(),
                        send_initial_events,
                    },
                )?;
                return Ok(Routed::Watch(w, info, shape));
            }
            srv.counters.bump("list", &resource);
            let list = page(srv, q, || store.list(gvr, ns, &list_opts))?;
            let mut list_meta = json!({"resourceVersion": list.resource_version.to_string()});
            if let Some(c) = &list.cont {
                list_meta["continue"] = json!(c);
                list_meta["remainingItemCount"] = json!(list.remaining);
            }
            if table_mode {
                let mut t = table::table(&info, &list.items, true, None);
                t["metadata"] = list_meta;
                return ok(&t);
            }
            if shape == Shape::Meta {
                let items: Vec<Value> = list.items.iter().map(|i| partial(i)).collect();
                return ok(&json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": list_meta,
                    "items": items,
                }));
            }
            let items: Vec<&Value> = list.items.iter().map(|i| i.as_ref()).collect();
            ok(&json!({
                "kind": format!("{}List", info.kind),
                "apiVersion": gvr.api_version(),
                "metadata": list_meta,
                "items": items,
            }))
        }
        (&Method::GET, Some(name)) => {
            srv.counters.bump("get", &resource);
            let obj = store.get(gvr, ns, name)?;
            if table_mode {
                return ok(&table::table(&info, &[Arc::new(obj)], true, None));
            }
            if shape == Shape::Meta {
                return ok(&partial(&obj));
            }
            ok(&obj)
        }
        (&Method::POST, None) => {
            srv.counters.bump("create", &resource);
            let obj = parse_body(headers, body)?;
            let created = store.create(gvr, ns, obj, &wopts)?;
            Ok(Routed::Response(json_response(201, &created)))
        }
        (&Method::POST, Some(name)) if t.sub.as_deref() == Some("eviction") => {
            srv.counters.bump("evict", &gvr.group_resource());
            let ev = parse_body(headers, body)?;
            store.evict(ns.unwrap_or(""), name, &ev)?;
            Ok(Routed::Response(json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            )))
        }
        (&Method::PUT, Some(name)) => {
            srv.counters.bump("update", &resource);
            let obj = parse_body(headers, body)?;
            if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
                return Err(StoreError::BadRequest {
                    message: "the name of the object does not match the name on the URL".into(),
                });
            }
            let mut obj = obj;
            obj["metadata"]["name"] = json!(name);
            ok(&store.update(gvr, ns, obj, sub, &wopts)?)
        }
        (&Method::PATCH, Some(name)) => {
            srv.counters.bump("patch", &resource);
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            // Custom resources have no Go types, so no strategic merge (kube-apiserver: 415).
            let accepted = if info.custom {
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
            } else {
                "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml"
            };
            let unsupported = || StoreError::UnsupportedMediaType {
                message: format!(
                    "the body of the request was in an unknown format - accepted media types include: {accepted}"
                ),
            };
            if info.custom && ct.starts_with("application/strategic-merge-patch+json") {
                return Err(unsupported());
            }
            let p = parse_body(headers, body)?;
            let patch = if ct.starts_with("application/apply-patch") {
                Patch::Apply(p)
            } else if ct.starts_with("application/json-patch+json") {
                Patch::Json(p)
            } else if ct.starts_with("application/merge-patch+json") {
                Patch::Merge(p)
            } else if ct.starts_with("application/strategic-merge-patch+json") {
                Patch::Strategic(p)
            } else {
                return Err(unsupported());
            };
            ok(&store.patch(gvr, ns, name, &patch, sub, &wopts)?)
        }
        (&Method::DELETE, None) => {
            srv.counters.bump("deletecollection", &resource);
            let b = parse_body(headers, body)?;
            let grace = q
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse().ok())
                .or(b["gracePeriodSeconds"].as_i64());
            let list = store.list(gvr, ns, &list_opts)?;
            let mut items = Vec::new();
            for o in &list.items {
                let name = o["metadata"]["name"].as_str().unwrap_or("");
                let ons = o["metadata"]["namespace"].as_str();
                let dopts = DeleteOptions {
                    grace_period_seconds: grace,
                    ..DeleteOptions::default()
                };
                match store.delete(gvr, ons, name, &dopts) {
                    Ok(Deleted::Gone(v) | Deleted::Pending(v)) => items.push(v),
                    Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            ok(&json!({
                "kind": format!("{}List", info.kind),
                "apiVersion": gvr.api_version(),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": items,
            }))
        }
        (&Method::DELETE, Some(name)) => {
            srv.counters.bump("delete", &resource);
            let b = parse_body(headers, body)?;
            let grace = q
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse().ok())
                .or(b["gracePeriodSeconds"].as_i64());
            let dopts = DeleteOptions {
                grace_period_seconds: grace,
                uid: b["preconditions"]["uid"].as_str().map(str::to_owned),
                resource_version: b["preconditions"]["resourceVersion"].as_str().map(str::to_owned),
            };
            match store.delete(gvr, ns, name, &dopts)? {
                Deleted::Pending(o) => ok(&o),
                Deleted::Gone(o) => {
                    if info.custom || gvr.plural == "pods" {
                        ok(&o)
                    } else {
                        ok(&json!({
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Success",
                            "details": {"name": name, "group": gvr.group, "kind": gvr.plural,
                                        "uid": o["metadata"]["uid"]},
                        }))
                    }
                }
            }
        }
        _ => Err(StoreError::MethodNotAllowed {
            message: format!("the server does not allow this method on the requested resource ({method})"),
        }),
    }
}

struct Streaming {
    watch: Watch,
    store: Store,
    info: Arc<ResourceInfo>,
    table: bool,
    meta: bool,
    headers_sent: bool,
    bookmarks: bool,
    interval: Duration,
    next_bookmark: Instant,
    deadline: Instant,
    max_rv: u64,
    pending: VecDeque<Bytes>,
    done: bool,
}

impl Streaming {
    fn encode(&mut self, ev: &WatchEvent) -> Option<Bytes> {
        let object = match ev {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                if self.table {
                    let t = table::table(&self.info, std::slice::from_ref(o), !self.headers_sent, None);
                    self.headers_sent = true;
                    let mut t = t;
                    t["metadata"]["resourceVersion"] = o["metadata"]["resourceVersion"].clone();
                    t
                } else if self.meta {
                    partial(o)
                } else {
                    // The common case: serialize the shared object without copying it.
                    self.max_rv = self.max_rv.max(ev.resource_version());
                    let mut line = format!("{{\"type\":\"{}\",\"object\":", ev.type_name()).into_bytes();
                    serde_json::to_writer(&mut line, &**o).ok()?;
                    line.extend_from_slice(b"}\n");
                    return Some(Bytes::from(line));
                }
            }
            WatchEvent::Bookmark {
                resource_version,
                initial_end,
            } => {
                if !self.bookmarks && !*initial_end {
                    return None;
                }
                let mut meta = json!({"resourceVersion": resource_version.to_string()});
                if *initial_end {
                    meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                }
                json!({"kind": self.info.kind, "apiVersion": self.info.gvr.api_version(), "metadata": meta})
            }
            WatchEvent::Error(s) => s.clone(),
        };
        let rv = ev.resource_version();
        self.max_rv = self.max_rv.max(rv);
        let mut line = serde_json::to_vec(&json!({"type": ev.type_name(), "object": object})).ok()?;
        line.push(b'\n');
        Some(Bytes::from(line))
    }

    fn bookmark(&mut self) -> Option<Bytes> {
        // Everything up to `current` is already in this watch's channel (commits dispatch under
        // the store lock), so drain it first; then the bookmark is truthful.
        let current = self.store.resource_version();
        while let Some(ev) = self.watch.try_next() {
            let is_err = matches!(ev, WatchEvent::Error(_));
            if let Some(b) = self.encode(&ev) {
                self.pending.push_back(b);
            }
            if is_err {
                self.done = true;
                return None;
            }
        }
        let rv = current.max(self.max_rv);
        self.encode(&WatchEvent::Bookmark {
            resource_version: rv,
            initial_end: false,
        })
    }
}

fn watch_response(
    srv: &Srv,
    watch: Watch,
    info: Arc<ResourceInfo>,
    shape: Shape,
    q: &HashMap<String, String>,
) -> Response {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let interval = srv.store.options().bookmark_interval;
    let now = Instant::now();
    let state = Streaming {
        watch,
        store: srv.store.clone(),
        info,
        table: shape == Shape::Table,
        meta: shape == Shape::Meta,
        headers_sent: false,
        bookmarks: bool_param(q, "allowWatchBookmarks") && shape != Shape::Table,
        interval,
        next_bookmark: now + interval,
        deadline: now + Duration::from_secs(timeout),
        max_rv: 0,
        pending: VecDeque::new(),
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(b) = s.pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), s));
            }
            if s.done {
                return None;
            }
            if let Some(ev) = s.watch.try_next() {
                if matches!(ev, WatchEvent::Error(_)) {
                    s.done = true;
                }
                if let Some(b) = s.encode(&ev) {
                    return Some((Ok(b), s));
                }
                continue;
            }
            let bookmark_at = s.next_bookmark;
            let deadline = s.deadline;
            tokio::select! {
                ev = s.watch.next() => match ev {
                    Some(ev) => {
                        if matches!(ev, WatchEvent::Error(_)) {
                            s.done = true;
                        }
                        if let Some(b) = s.encode(&ev) {
                            return Some((Ok(b), s));
                        }
                    }
                    None => return None,
                },
                _ = tokio::time::sleep_until(bookmark_at), if s.bookmarks => {
                    s.next_bookmark = Instant::now() + s.interval;
                    if let Some(b) = s.bookmark() {
                        s.pending.push_back(b);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    s.done = true;
                    if s.bookmarks
                        && let Some(b) = s.bookmark() {
                            s.pending.push_back(b);
                        }
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
