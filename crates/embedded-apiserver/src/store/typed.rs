//! Typed conveniences over the JSON store for `kube::Resource` types (what simulated kubelets
//! and tests use in-process).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::super::error::StoreError;
use super::super::resources::Gvr;
use super::{ListOptions, Patch, Store, Subresource, WriteOptions};

impl Store {
    /// [`Store::get`] for a typed resource.
    pub fn get_as<K>(&self, ns: Option<&str>, name: &str) -> Result<K, StoreError>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        from_value(self.get(&Gvr::of::<K>(), ns, name)?)
    }

    /// [`Store::list`] for a typed resource.
    pub fn list_as<K>(&self, ns: Option<&str>, opts: &ListOptions) -> Result<Vec<K>, StoreError>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        self.list(&Gvr::of::<K>(), ns, opts)?
            .items
            .into_iter()
            .map(|o| from_value((*o).clone()))
            .collect()
    }

    /// [`Store::create`] for a typed resource (namespace taken from the object).
    pub fn create_as<K>(&self, obj: &K, opts: &WriteOptions) -> Result<K, StoreError>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let v = to_value::<K>(obj)?;
        let ns = obj.meta().namespace.clone();
        from_value(self.create(&Gvr::of::<K>(), ns.as_deref(), v, opts)?)
    }

    /// [`Store::update`] for a typed resource.
    pub fn update_as<K>(&self, obj: &K, sub: Subresource, opts: &WriteOptions) -> Result<K, StoreError>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let v = to_value::<K>(obj)?;
        let ns = obj.meta().namespace.clone();
        from_value(self.update(&Gvr::of::<K>(), ns.as_deref(), v, sub, opts)?)
    }

    /// [`Store::patch`] for a typed resource.
    pub fn patch_as<K>(
        &self,
        ns: Option<&str>,
        name: &str,
        patch: &Patch,
        sub: Subresource,
        opts: &WriteOptions,
    ) -> Result<K, StoreError>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        from_value(self.patch(&Gvr::of::<K>(), ns, name, patch, sub, opts)?)
    }
}

fn from_value<K: DeserializeOwned>(v: Value) -> Result<K, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Internal {
        message: format!("decoding stored object failed: {e}"),
    })
}

fn to_value<K: kube::Resource<DynamicType = ()> + Serialize>(obj: &K) -> Result<Value, StoreError> {
    let mut v = serde_json::to_value(obj).map_err(|e| StoreError::BadRequest {
        message: format!("encoding object failed: {e}"),
    })?;
    if v.get("apiVersion").is_none_or(Value::is_null) {
        v["apiVersion"] = json!(K::api_version(&()));
    }
    if v.get("kind").is_none_or(Value::is_null) {
        v["kind"] = json!(K::kind(&()));
    }
    Ok(v)
}
