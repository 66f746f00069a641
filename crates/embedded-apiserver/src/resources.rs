//! The resource registry: which kinds the server serves, with the properties the real
//! kube-apiserver attaches to them (scope, short names, status subresource, generation).
//! Built-in kinds are listed here; custom resources are registered from their CRD objects.

use std::sync::Arc;

use serde_json::Value;

/// Group, version and resource (plural) name: the address of a collection in the API.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gvr {
    /// API group; empty for the core group.
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Plural resource name, e.g. `pods`.
    pub plural: String,
}

impl Gvr {
    /// A GVR from its parts.
    pub fn new(group: &str, version: &str, plural: &str) -> Gvr {
        Gvr {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
        }
    }

    /// The GVR of a typed Kubernetes resource, e.g. `Gvr::of::<Pod>()`.
    pub fn of<K: kube::Resource<DynamicType = ()>>() -> Gvr {
        Gvr::new(&K::group(&()), &K::version(&()), &K::plural(&()))
    }

    /// `group/version`, or just `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The group-resource string used in messages and as storage key: `pods`,
    /// `nixosnodes.nixroll.io`.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// One printer column of a CRD (`additionalPrinterColumns`).
#[derive(Clone, Debug)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// OpenAPI type: string, integer, number, boolean, date.
    pub type_: String,
    /// Simple JSONPath evaluated against the object.
    pub json_path: String,
    /// Description shown by `kubectl explain`-like tools.
    pub description: String,
    /// 0 = shown by default; >0 only with `-o wide`.
    pub priority: i64,
}

/// How storage of a resource is shared across versions and groups.
#[derive(Clone, Debug)]
pub struct ResourceInfo {
    /// Address.
    pub gvr: Gvr,
    /// Kind, e.g. `Pod`.
    pub kind: String,
    /// Singular name.
    pub singular: String,
    /// Namespaced (true) or cluster-scoped.
    pub namespaced: bool,
    /// Short names for kubectl.
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Has a `/status` subresource: the main endpoint ignores `.status`.
    pub status_subresource: bool,
    /// `metadata.generation` is maintained (bumped on spec changes).
    pub generation: bool,
    /// `.status` is reset on create (for pods: to `{phase: Pending}`).
    pub reset_status_on_create: bool,
    /// PUT without `metadata.resourceVersion` is allowed.
    pub allow_unconditional_update: bool,
    /// Served from a CRD.
    pub custom: bool,
    /// Printer columns (CRDs).
    pub printer_columns: Vec<PrinterColumn>,
    /// The CRD's `openAPIV3Schema` (list types for server-side apply).
    pub schema: Option<Value>,
    /// Storage key: objects of all versions of this group-resource share it.
    pub storage_key: String,
    /// Subresources besides status (e.g. `eviction` for pods).
    pub extra_subresources: Vec<(&'static str, &'static str, &'static [&'static str])>,
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl ResourceInfo {
    /// Verbs served on the main resource.
    pub fn verbs(&self) -> &'static [&'static str] {
        VERBS
    }
}

/// The resources served under one group and version (`/api/v1`, `/apis/{group}/{version}`).
pub fn in_group_version<'r>(
    resources: &'r [Arc<ResourceInfo>],
    group: &str,
    version: &str,
) -> Vec<&'r Arc<ResourceInfo>> {
    resources
        .iter()
        .filter(|r| r.gvr.group == group && r.gvr.version == version)
        .collect()
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    generation: bool,
    reset_status: bool,
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
        status: true,
        generation: false,
        reset_status: false,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        short: &["no"],
        status: true,
        generation: false,
        reset_status: false,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
        status: true,
        generation: true,
        reset_status: true,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
        status: false,
        generation: false,
        reset_status: false,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        short: &[],
        status: false,
        generation: false,
        reset_status: false,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        status: false,
        generation: false,
        reset_status: false,
    },
    Builtin {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        status: false,
        generation: false,
        reset_status: false,
    },
    Builtin {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        short: &[],
        status: false,
        generation: false,
        reset_status: false,
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        kind: "DaemonSet",
        namespaced: true,
        short: &["ds"],
        status: true,
        generation: true,
        reset_status: true,
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "replicasets",
        kind: "ReplicaSet",
        namespaced: true,
        short: &["rs"],
        status: true,
        generation: true,
        reset_status: true,
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "deployments",
        kind: "Deployment",
        namespaced: true,
        short: &["deploy"],
        status: true,
        generation: true,
        reset_status: true,
    },
    Builtin {
        group: "policy",
        version: "v1",
        plural: "poddisruptionbudgets",
        kind: "PodDisruptionBudget",
        namespaced: true,
        short: &["pdb"],
        status: true,
        generation: true,
        reset_status: true,
    },
    Builtin {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short: &["crd", "crds"],
        status: true,
        generation: true,
        reset_status: true,
    },
];

/// The built-in resources.
pub fn builtins() -> Vec<Arc<ResourceInfo>> {
    BUILTINS
        .iter()
        .map(|b| {
            let gvr = Gvr::new(b.group, b.version, b.plural);
            // core/v1 and events.k8s.io/v1 Events are one storage, as in the real server.
            let storage_key = if b.plural == "events" {
                "events".to_owned()
            } else {
                gvr.group_resource()
            };
            let extra: Vec<(&'static str, &'static str, &'static [&'static str])> = if b.plural == "pods" {
                vec![("eviction", "Eviction", &["create"])]
            } else {
                Vec::new()
            };
            let categories = match b.plural {
                "pods" | "daemonsets" | "replicasets" | "deployments" => vec!["all".to_owned()],
                _ => Vec::new(),
            };
            Arc::new(ResourceInfo {
                kind: b.kind.to_owned(),
                singular: b.kind.to_lowercase(),
                namespaced: b.namespaced,
                short_names: b.short.iter().map(|s| (*s).to_owned()).collect(),
                categories,
                status_subresource: b.status,
                generation: b.generation,
                reset_status_on_create: b.reset_status,
                allow_unconditional_update: true,
                custom: false,
                printer_columns: Vec::new(),
                schema: None,
                storage_key,
                extra_subresources: extra,
                gvr,
            })
        })
        .collect()
}

/// The served versions of a CRD object as resources (empty when the CRD is malformed).
pub fn from_crd(crd: &Value) -> Vec<Arc<ResourceInfo>> {
    let spec = &crd["spec"];
    let Some(group) = spec["group"].as_str() else {
        return Vec::new();
    };
    let names = &spec["names"];
    let (Some(plural), Some(kind)) = (names["plural"].as_str(), names["kind"].as_str()) else {
        return Vec::new();
    };
    let singular = names["singular"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| kind.to_lowercase());
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let short_names = strings(&names["shortNames"]);
    let categories = strings(&names["categories"]);
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let mut out = Vec::new();
    for v in spec["versions"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        if v["served"].as_bool() == Some(false) {
            continue;
        }
        let Some(version) = v["name"].as_str() else {
            continue;
        };
        let printer_columns = v["additionalPrinterColumns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .filter_map(|c| {
                        Some(PrinterColumn {
                            name: c["name"].as_str()?.to_owned(),
                            type_: c["type"].as_str().unwrap_or("string").to_owned(),
                            json_path: c["jsonPath"].as_str()?.to_owned(),
                            description: c["description"].as_str().unwrap_or("").to_owned(),
                            priority: c["priority"].as_i64().unwrap_or(0),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let gvr = Gvr::new(group, version, plural);
        out.push(Arc::new(ResourceInfo {
            storage_key: gvr.group_resource(),
            gvr,
            kind: kind.to_owned(),
            singular: singular.clone(),
            namespaced,
            short_names: short_names.clone(),
            categories: categories.clone(),
            status_subresource: v["subresources"]["status"].is_object(),
            generation: true,
            reset_status_on_create: v["subresources"]["status"].is_object(),
            allow_unconditional_update: false,
            custom: true,
            printer_columns,
            schema: v["schema"]["openAPIV3Schema"]
                .is_object()
                .then(|| v["schema"]["openAPIV3Schema"].clone()),
            extra_subresources: Vec::new(),
        }));
    }
    out
}
