//! Opt-in (`--sidecar-cluster-role`): the sidecar's permissions in each pool's namespace, for
//! the ServiceAccounts its pods actually run as, without a Helm upgrade per team.
//!
//! ```text
//! webhook: injects a pod ─► annotation modelpool.io/service-account: <spec.serviceAccountName>
//! controller (pod metadata watch) ─► RoleBinding modelpool-sidecar-<pool> in the pool's namespace
//!     roleRef: ClusterRole <--sidecar-cluster-role>   subjects: those ServiceAccounts
//!     ownerReferences: the pool (the garbage collector deletes it with the pool)
//! ```
//!
//! The binding is written with server-side apply only when its subjects change (a cache per
//! pool), so an unchanged pool costs no API call. The operator needs `bind` on that one
//! ClusterRole and `get`/`create`/`patch` on RoleBindings; the chart grants them only when
//! `sidecar.rbac.autoBind` is on.

use std::collections::BTreeSet;

use k8s_openapi::{
    api::rbac::v1::{RoleBinding, RoleRef, Subject},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use modelpool_crds::ModelPool;

use crate::FIELD_MANAGER;

/// Set by the webhook on every injected pod: the ServiceAccount the pod runs as.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "modelpool.io/service-account";

/// The RoleBinding's name for a pool.
pub fn binding_name(pool: &str) -> String {
    let mut name = format!("modelpool-sidecar-{pool}");
    name.truncate(253);
    name
}

/// The ServiceAccounts of the governed pods, sorted and without duplicates.
pub fn service_accounts<'a>(
    metas: impl IntoIterator<Item = &'a ObjectMeta>,
    governed: &[String],
) -> Vec<String> {
    metas
        .into_iter()
        .filter(|m| m.name.as_ref().is_some_and(|n| governed.contains(n)))
        .filter_map(|m| {
            m.annotations
                .as_ref()
                .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION))
                .filter(|sa| !sa.is_empty())
                .cloned()
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The desired RoleBinding (pure).
pub fn desired(pool: &ModelPool, cluster_role: &str, accounts: &[String]) -> RoleBinding {
    let namespace = pool.namespace().unwrap_or_default();
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(binding_name(&pool.name_any())),
            namespace: Some(namespace.clone()),
            labels: Some(
                [
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        "modelpool-operator".to_owned(),
                    ),
                    (
                        "app.kubernetes.io/component".to_owned(),
                        "sidecar".to_owned(),
                    ),
                ]
                .into(),
            ),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: cluster_role.to_owned(),
        },
        subjects: Some(
            accounts
                .iter()
                .map(|sa| Subject {
                    kind: "ServiceAccount".into(),
                    name: sa.clone(),
                    namespace: Some(namespace.clone()),
                    api_group: None,
                })
                .collect(),
        ),
    }
}

/// Writes the binding (server-side apply).
pub async fn apply(client: &kube::Client, binding: &RoleBinding) -> Result<(), kube::Error> {
    let namespace = binding.metadata.namespace.clone().unwrap_or_default();
    let name = binding.metadata.name.clone().unwrap_or_default();
    let api: Api<RoleBinding> = Api::namespaced(client.clone(), &namespace);
    let mut body = serde_json::to_value(binding).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = "rbac.authorization.k8s.io/v1".into();
    body["kind"] = "RoleBinding".into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, sa: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            annotations: sa
                .map(|sa| [(SERVICE_ACCOUNT_ANNOTATION.to_owned(), sa.to_owned())].into()),
            ..ObjectMeta::default()
        }
    }

    /// Catches subjects taken from pods the pool does not govern, duplicates, or pods
    /// injected before the annotation existed breaking the list.
    #[test]
    fn subjects_are_the_governed_pods_service_accounts() {
        let metas = [
            meta("a", Some("video")),
            meta("b", Some("video")),
            meta("c", Some("batch")),
            meta("other-pool", Some("intruder")),
            meta("old", None),
        ];
        let governed: Vec<String> = ["a", "b", "c", "old"].map(String::from).into();
        assert_eq!(service_accounts(&metas, &governed), ["batch", "video"]);
    }

    /// Catches a binding that would outlive its pool, bind another role, or name a subject
    /// in another namespace.
    #[test]
    fn the_binding_is_owned_by_the_pool_and_stays_in_its_namespace() {
        let mut pool = ModelPool::new(
            "cogvideo",
            serde_json::from_value(serde_json::json!({"models": [{"name": "t2v"}]})).unwrap(),
        );
        pool.metadata.namespace = Some("video".into());
        pool.metadata.uid = Some("uid-1".into());
        let binding = desired(&pool, "mp-modelpool-system-sidecar", &["cogvideo".into()]);
        assert_eq!(
            binding.metadata.name.as_deref(),
            Some("modelpool-sidecar-cogvideo")
        );
        assert_eq!(binding.metadata.namespace.as_deref(), Some("video"));
        let owner = &binding.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ModelPool", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(binding.role_ref.name, "mp-modelpool-system-sidecar");
        let subject = &binding.subjects.as_ref().unwrap()[0];
        assert_eq!(subject.namespace.as_deref(), Some("video"));
        assert_eq!(subject.name, "cogvideo");
    }
}
