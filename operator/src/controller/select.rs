//! Which pods a pool governs, and which pool wins when two select the same pod.
//!
//! A pool governs the pods of its namespace that match `spec.selector`, or, without one,
//! the pods labelled `modelpool.io/pool: <name>`. Only pods carrying that label are watched
//! (an injected pod always does), so a pod outside it is never counted. When two pools select
//! one pod, the older pool (creation time, then name) keeps it and the newer one gets a
//! `Conflict` condition.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use modelpool_crds::{ModelPool, POOL_LABEL};

/// Whether a label selector matches a label set (matchLabels and matchExpressions).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .as_ref()
        .is_none_or(|wanted| wanted.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let expressions_ok = selector.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
    });
    labels_ok && expressions_ok
}

/// Whether `pool` selects the pod with this metadata (same namespace assumed).
pub fn pool_selects(pool: &ModelPool, pod: &ObjectMeta) -> bool {
    let empty = BTreeMap::new();
    let labels = pod.labels.as_ref().unwrap_or(&empty);
    match &pool.spec.selector {
        Some(selector) => selector_matches(selector, labels),
        None => labels.get(POOL_LABEL) == pool.metadata.name.as_ref(),
    }
}

/// Orders pools oldest first (creation time, then name): the older keeps contested pods.
pub fn seniority(pool: &ModelPool) -> (i64, String) {
    let created = pool
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| t.0.as_second());
    (created, pool.metadata.name.clone().unwrap_or_default())
}

/// What one pool governs after conflicts are settled.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Selection {
    /// Names of the pods this pool governs.
    pub pods: Vec<String>,
    /// Older pools that took pods this pool also selects.
    pub conflicts_with: Vec<String>,
}

/// Settles which pods `pool` governs among `others` (all pools of its namespace, itself
/// included or not) over `pods` (the labelled pods of the namespace).
pub fn select<'a>(
    pool: &ModelPool,
    others: impl IntoIterator<Item = &'a ModelPool>,
    pods: &[&ObjectMeta],
) -> Selection {
    let me = seniority(pool);
    let older: Vec<&ModelPool> = others
        .into_iter()
        .filter(|other| other.metadata.name != pool.metadata.name && seniority(other) < me)
        .collect();
    let mut selection = Selection::default();
    for pod in pods {
        if !pool_selects(pool, pod) {
            continue;
        }
        match older.iter().find(|other| pool_selects(other, pod)) {
            Some(winner) => {
                let name = winner.metadata.name.clone().unwrap_or_default();
                if !selection.conflicts_with.contains(&name) {
                    selection.conflicts_with.push(name);
                }
            }
            None => selection.pods.push(pod.name.clone().unwrap_or_default()),
        }
    }
    selection.pods.sort();
    selection.conflicts_with.sort();
    selection
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time},
        jiff::Timestamp,
    };

    use super::*;

    fn pool(name: &str, created: i64, selector: Option<LabelSelector>) -> ModelPool {
        let mut pool: ModelPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"models": [{"name": "a"}]}
        }))
        .unwrap();
        pool.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        pool.spec.selector = selector;
        pool
    }

    fn pod(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    fn app(value: &str) -> Option<LabelSelector> {
        Some(LabelSelector {
            match_labels: Some([("app".to_string(), value.to_string())].into()),
            ..LabelSelector::default()
        })
    }

    #[test]
    fn without_selector_the_pool_label_decides() {
        let p = pool("video", 1, None);
        let pods = [
            pod("a", &[(POOL_LABEL, "video")]),
            pod("b", &[(POOL_LABEL, "llm")]),
        ];
        let refs: Vec<&ObjectMeta> = pods.iter().collect();
        assert_eq!(select(&p, [], &refs).pods, ["a"]);
    }

    #[test]
    fn match_expressions_are_honoured() {
        let selector = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["gpu".into()]),
            }]),
            ..LabelSelector::default()
        };
        let labels = [("tier".to_string(), "gpu".to_string())].into();
        assert!(selector_matches(&selector, &labels));
        assert!(!selector_matches(&selector, &BTreeMap::new()));
    }

    #[test]
    fn the_older_pool_keeps_contested_pods() {
        let old = pool("old", 10, app("x"));
        let new = pool("new", 20, app("x"));
        let pods = [pod("p1", &[("app", "x"), (POOL_LABEL, "old")])];
        let refs: Vec<&ObjectMeta> = pods.iter().collect();
        let both = [old.clone(), new.clone()];
        assert_eq!(select(&old, &both, &refs).pods, ["p1"]);
        let newer = select(&new, &both, &refs);
        assert!(newer.pods.is_empty());
        assert_eq!(newer.conflicts_with, ["old"]);
    }
}
