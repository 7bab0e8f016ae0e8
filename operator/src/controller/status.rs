//! Pure aggregation: the pods' sidecar reports and the selection become the pool's `status`.
//!
//! Conditions follow the API conventions: `status` True/False, a PascalCase `reason`, a
//! message for people, `observedGeneration`, and a `lastTransitionTime` that only moves when
//! `status` changes (so a reconcile that finds nothing new writes nothing).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use modelpool_crds::{
    ModelPool, ModelPoolStatus, Quantity,
    report::PodReport,
    v1alpha1::{
        LearnedStatus, ModelSizes, ModelSpec, ModelStatus, SizeBytes,
        conditions::{reasons, types},
    },
};

use super::select::Selection;

/// What the operator knows of one governed pod.
#[derive(Debug, Clone)]
pub struct PodView {
    /// The pod's name.
    pub name: String,
    /// Its sidecar's report: none yet, unreadable, or read.
    pub report: Option<Result<PodReport, String>>,
    /// Whether the webhook injected the sidecar (`modelpool.io/injected`): a pod admitted
    /// while the webhook was unreachable (`failurePolicy: Ignore`) runs without it.
    pub injected: bool,
}

/// Most pod names a condition message lists.
const MAX_NAMED: usize = 10;

/// `names` joined, at most [`MAX_NAMED`] of them, then how many more.
fn named(names: &[&str]) -> String {
    let mut text = names
        .iter()
        .take(MAX_NAMED)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_NAMED {
        text.push_str(&format!(" and {} more", names.len() - MAX_NAMED));
    }
    text
}

/// A pod's learned size merged into what the pool knows: the larger peak under the same
/// declared size; a report learned under another declared size (the pool was edited)
/// replaces what was kept.
fn merge_learned(
    kept: Option<LearnedStatus>,
    size: &modelpool_crds::report::LearnedReport,
) -> LearnedStatus {
    let reported = LearnedStatus {
        peak_vram_bytes: size.vram,
        peak_ram_bytes: size.ram,
        declared_vram_bytes: size.dvram,
        declared_ram_bytes: size.dram,
    };
    match kept {
        Some(kept)
            if (kept.declared_vram_bytes, kept.declared_ram_bytes)
                == (reported.declared_vram_bytes, reported.declared_ram_bytes) =>
        {
            LearnedStatus {
                peak_vram_bytes: kept.peak_vram_bytes.max(reported.peak_vram_bytes),
                peak_ram_bytes: kept.peak_ram_bytes.max(reported.peak_ram_bytes),
                ..kept
            }
        }
        _ => reported,
    }
}

/// The larger, per resource, of `kept` and a reported size.
fn larger(kept: Option<SizeBytes>, vram: u64, ram: u64) -> SizeBytes {
    let kept = kept.unwrap_or_default();
    SizeBytes {
        vram_bytes: kept.vram_bytes.max(vram),
        ram_bytes: kept.ram_bytes.max(ram),
    }
}

/// A model's sizes side by side (`status.models[].sizes`): declared from the spec, the
/// estimate the pods reported (kept from the last status while no pod reports one, dropped
/// once a size is declared), the last measurement the pods report now, and the peak learned.
fn finish_sizes(model: &ModelSpec, status: &mut ModelStatus, previous: Option<&ModelPoolStatus>) {
    let bytes = |q: Option<&Quantity>| q.and_then(|q| q.bytes().ok()).unwrap_or(0);
    let mut sizes = status.sizes.take().unwrap_or_default();
    sizes.declared = (model.vram.is_some() || model.ram.is_some()).then(|| SizeBytes {
        vram_bytes: bytes(model.vram.as_ref()),
        ram_bytes: bytes(model.ram.as_ref()),
    });
    if sizes.declared.is_some() {
        sizes.estimated = None;
    } else if sizes.estimated.is_none() {
        sizes.estimated = previous
            .and_then(|s| s.models.iter().find(|p| p.name == model.name))
            .and_then(|p| p.sizes.as_ref()?.estimated);
    }
    sizes.peak = status.learned.as_ref().map(|l| SizeBytes {
        vram_bytes: l.peak_vram_bytes,
        ram_bytes: l.peak_ram_bytes,
    });
    status.sizes = (sizes != ModelSizes::default()).then_some(sizes);
}

/// Everything `compute` needs.
pub struct Inputs<'a> {
    /// The pool.
    pub pool: &'a ModelPool,
    /// Pods it governs, conflicts.
    pub selection: &'a Selection,
    /// The governed pods with their reports.
    pub pods: &'a [PodView],
    /// The time to stamp on conditions that change.
    pub now: Time,
    /// What the spec gets wrong that CEL could not catch (e.g. pinned models together above
    /// a ceiling), with the numbers.
    pub invalid: Option<String>,
}

/// The new status.
pub fn compute(inputs: &Inputs<'_>) -> ModelPoolStatus {
    let pool = inputs.pool;
    let previous = pool.status.as_ref();
    let generation = pool.metadata.generation;

    let mut per_model: BTreeMap<&str, ModelStatus> = pool
        .spec
        .models
        .iter()
        .map(|m| {
            (
                m.name.as_str(),
                ModelStatus {
                    name: m.name.clone(),
                    // Kept from the last status: pods come and go, what was measured stays.
                    learned: previous
                        .and_then(|s| s.models.iter().find(|p| p.name == m.name))
                        .and_then(|p| p.learned.clone()),
                    ..ModelStatus::default()
                },
            )
        })
        .collect();
    let (mut reporting, mut loads, mut evictions, mut vram, mut ram) =
        (0i32, 0i64, 0i64, 0u64, 0u64);
    let mut unverified = 0i64;
    let mut unverified_in = Vec::new();
    let mut over_ceiling = Vec::new();
    let mut errors = Vec::new();
    for pod in inputs.pods {
        match &pod.report {
            Some(Ok(report)) => {
                reporting += 1;
                loads += i64::try_from(report.loads).unwrap_or(i64::MAX);
                evictions += i64::try_from(report.evictions).unwrap_or(i64::MAX);
                if report.unverified > 0 {
                    unverified = unverified
                        .saturating_add(i64::try_from(report.unverified).unwrap_or(i64::MAX));
                    unverified_in.push(format!("{} ({})", pod.name, report.unverified));
                }
                vram = vram.saturating_add(report.vram);
                ram = ram.saturating_add(report.ram);
                if report.over {
                    over_ceiling.push(pod.name.clone());
                }
                if let Some(err) = &report.err {
                    errors.push(format!("{}: {err}", pod.name));
                }
                for size in &report.learned {
                    if let Some(status) = per_model.get_mut(size.name.as_str()) {
                        status.learned = Some(merge_learned(status.learned.take(), size));
                        if size.mvram > 0 || size.mram > 0 {
                            let sizes = status.sizes.get_or_insert_with(ModelSizes::default);
                            sizes.measured = Some(larger(sizes.measured, size.mvram, size.mram));
                        }
                    }
                }
                for estimate in &report.est {
                    if let Some(status) = per_model.get_mut(estimate.name.as_str()) {
                        let sizes = status.sizes.get_or_insert_with(ModelSizes::default);
                        sizes.estimated =
                            Some(larger(sizes.estimated, estimate.vram, estimate.ram));
                    }
                }
                for model in &report.models {
                    if let Some(status) = per_model.get_mut(model.name.as_str()) {
                        status.loaded_in += 1;
                        status.loads += i64::try_from(model.loads).unwrap_or(i64::MAX);
                        status.evictions += i64::try_from(model.evictions).unwrap_or(i64::MAX);
                    }
                }
            }
            Some(Err(problem)) => {
                errors.push(format!("{}: unreadable report: {problem}", pod.name))
            }
            None => {}
        }
    }
    for model in &pool.spec.models {
        if let Some(status) = per_model.get_mut(model.name.as_str()) {
            finish_sizes(model, status, previous);
        }
    }
    let matched = i32::try_from(inputs.pods.len()).unwrap_or(i32::MAX);
    let loaded_models = per_model.values().filter(|m| m.loaded_in > 0).count();

    let silent: Vec<&str> = inputs
        .pods
        .iter()
        .filter(|p| p.report.is_none())
        .map(|p| p.name.as_str())
        .collect();
    let conflict = !inputs.selection.conflicts_with.is_empty();

    let mut conditions = Vec::new();
    let (ready, ready_reason, ready_message) = if let Some(problem) = &inputs.invalid {
        (false, reasons::INVALID_SPEC, problem.clone())
    } else if conflict {
        (
            false,
            reasons::OVERLAPPING_SELECTOR,
            format!(
                "pods selected by this pool are governed by the older pool(s) {}",
                inputs.selection.conflicts_with.join(", ")
            ),
        )
    } else if matched == 0 {
        (
            true,
            reasons::NO_PODS,
            "no pods match the selector yet".to_owned(),
        )
    } else if silent.is_empty() {
        (
            true,
            reasons::ALL_PODS_REPORTING,
            format!("{reporting}/{matched} pods report"),
        )
    } else {
        (
            false,
            reasons::PODS_NOT_REPORTING,
            format!(
                "{reporting}/{matched} pods report; waiting for {}",
                silent.join(", ")
            ),
        )
    };
    conditions.push(condition(types::READY, ready, ready_reason, ready_message));

    let degraded = !errors.is_empty();
    conditions.push(condition(
        types::DEGRADED,
        degraded,
        if degraded {
            reasons::SIDECAR_ERROR
        } else {
            reasons::ALL_PODS_REPORTING
        },
        if degraded {
            errors.join("; ")
        } else {
            "no sidecar reports an error".to_owned()
        },
    ));
    let over = !over_ceiling.is_empty();
    conditions.push(condition(
        types::CEILING_EXCEEDED,
        over,
        if over {
            reasons::OVER_CEILING
        } else {
            reasons::WITHIN_CEILINGS
        },
        if over {
            format!(
                "measured usage above a ceiling in {}",
                over_ceiling.join(", ")
            )
        } else {
            "every pod is within its ceilings".to_owned()
        },
    ));
    conditions.push(condition(
        types::CONFLICT,
        conflict,
        if conflict {
            reasons::OVERLAPPING_SELECTOR
        } else {
            reasons::NO_CONFLICT
        },
        if conflict {
            format!(
                "selector overlaps the older pool(s) {}",
                inputs.selection.conflicts_with.join(", ")
            )
        } else {
            "no other pool selects these pods".to_owned()
        },
    ));

    let without: Vec<&str> = inputs
        .pods
        .iter()
        .filter(|p| !p.injected)
        .map(|p| p.name.as_str())
        .collect();
    let ungoverned = !without.is_empty();
    conditions.push(condition(
        types::SIDECARS_INJECTED,
        !ungoverned,
        if ungoverned {
            reasons::PODS_WITHOUT_SIDECAR
        } else {
            reasons::ALL_PODS_INJECTED
        },
        if ungoverned {
            format!(
                "{} of {matched} selected pods run without the sidecar, so nothing limits them (admitted while the webhook was unreachable, or before the pool existed): {}; delete them to have them recreated with it, or set the chart's webhook.failurePolicy: Fail",
                without.len(),
                named(&without)
            )
        } else {
            "every selected pod carries the sidecar".to_owned()
        },
    ));

    // Unloads taken on the word of the app or server (no reading covers their memory) are
    // shown, never folded into reclaimed memory: the platform team sees which pods.
    let unproven = unverified > 0;
    conditions.push(condition(
        types::RECLAIM_VERIFIED,
        !unproven,
        if unproven {
            reasons::UNLOADS_UNVERIFIED
        } else {
            reasons::ALL_UNLOADS_VERIFIED
        },
        if unproven {
            format!(
                "{unverified} unloads were not proven by any reading (no GPU reading of the pod's processes; see the gpu.access setting and docs/gpu.md), in {}",
                named(&unverified_in.iter().map(String::as_str).collect::<Vec<_>>())
            )
        } else {
            "every unload so far was seen back by a reading".to_owned()
        },
    ));

    // Keep lastTransitionTime where the status did not change.
    for condition in &mut conditions {
        condition.observed_generation = generation;
        let before =
            previous.and_then(|s| s.conditions.iter().find(|c| c.type_ == condition.type_));
        condition.last_transition_time = match before {
            Some(before) if before.status == condition.status => {
                before.last_transition_time.clone()
            }
            _ => inputs.now.clone(),
        };
    }

    ModelPoolStatus {
        observed_generation: generation,
        conditions,
        pods_matched: matched,
        pods_reporting: reporting,
        pods_ready: Some(format!("{reporting}/{matched}")),
        models_loaded: Some(format!("{loaded_models}/{}", pool.spec.models.len())),
        models: per_model.into_values().collect(),
        loads,
        evictions,
        unverified_unloads: unverified,
        vram_used: Some(Quantity::from_bytes(vram)),
        ram_used: Some(Quantity::from_bytes(ram)),
    }
}

fn condition(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: None,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// The condition of a type, if present.
pub fn find<'a>(status: Option<&'a ModelPoolStatus>, type_: &str) -> Option<&'a Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

#[cfg(test)]
mod tests {
    use modelpool_crds::report::ModelReport;

    use super::*;

    fn pool() -> ModelPool {
        let mut pool: ModelPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
            "metadata": {"name": "video", "namespace": "ns", "generation": 3},
            "spec": {"models": [{"name": "t2v"}, {"name": "upscale"}]}
        }))
        .unwrap();
        pool.status = None;
        pool
    }

    fn now(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    fn report(models: &[&str], vram: u64) -> Option<Result<PodReport, String>> {
        Some(Ok(PodReport {
            v: 1,
            pool: "video".into(),
            models: models
                .iter()
                .map(|m| ModelReport {
                    name: m.to_string(),
                    loads: 1,
                    ..ModelReport::default()
                })
                .collect(),
            vram,
            loads: models.len() as u64,
            ..PodReport::default()
        }))
    }

    #[test]
    fn aggregates_reports() {
        let pool = pool();
        let selection = Selection {
            pods: vec!["a".into(), "b".into(), "c".into()],
            conflicts_with: vec![],
        };
        let pods = [
            PodView {
                name: "a".into(),
                report: report(&["t2v"], 1 << 30),
                injected: true,
            },
            PodView {
                name: "b".into(),
                report: report(&["t2v", "upscale"], 2 << 30),
                injected: true,
            },
            PodView {
                name: "c".into(),
                report: None,
                injected: true,
            },
        ];
        let status = compute(&Inputs {
            pool: &pool,
            selection: &selection,
            pods: &pods,
            now: now(100),
            invalid: None,
        });
        assert_eq!(status.pods_matched, 3);
        assert_eq!(status.pods_reporting, 2);
        assert_eq!(status.pods_ready.as_deref(), Some("2/3"));
        assert_eq!(status.models_loaded.as_deref(), Some("2/2"));
        assert_eq!(status.models[0].name, "t2v");
        assert_eq!(status.models[0].loaded_in, 2);
        assert_eq!(status.loads, 3);
        assert_eq!(status.vram_used.as_ref().unwrap().0, "3Gi");
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "PodsNotReporting")
        );
        assert_eq!(ready.observed_generation, Some(3));
    }

    /// Unverified unloads (no reading covered their memory) are summed, and a condition names
    /// the pods; with none, the condition says every unload was proven.
    #[test]
    fn unverified_unloads_are_summed_and_named() {
        let pool = pool();
        let selection = Selection {
            pods: vec!["a".into(), "b".into()],
            conflicts_with: vec![],
        };
        let unverified = |n: u64| {
            Some(Ok(PodReport {
                unverified: n,
                ..report(&[], 0).unwrap().unwrap()
            }))
        };
        let view = |name: &str, n: u64| PodView {
            name: name.into(),
            report: unverified(n),
            injected: true,
        };
        let status = |pods: &[PodView]| {
            compute(&Inputs {
                pool: &pool,
                selection: &selection,
                pods,
                now: now(100),
                invalid: None,
            })
        };
        let mixed = status(&[view("a", 3), view("b", 0)]);
        assert_eq!(mixed.unverified_unloads, 3);
        let condition = find(Some(&mixed), types::RECLAIM_VERIFIED).unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", reasons::UNLOADS_UNVERIFIED)
        );
        assert!(condition.message.contains("a (3)"), "{}", condition.message);
        assert!(!condition.message.contains("b ("), "{}", condition.message);

        let proven = status(&[view("a", 0), view("b", 0)]);
        assert_eq!(proven.unverified_unloads, 0);
        let condition = find(Some(&proven), types::RECLAIM_VERIFIED).unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("True", reasons::ALL_UNLOADS_VERIFIED)
        );
    }

    /// Learned sizes: the larger peak over pods under the same declared size, kept when the
    /// pods that measured it are gone, replaced when the pool's declared size changed.
    #[test]
    fn learned_sizes_are_merged_and_kept() {
        use modelpool_crds::report::LearnedReport;
        let learned = |vram: u64, dvram: u64| LearnedReport {
            name: "t2v".into(),
            vram,
            dvram,
            ..LearnedReport::default()
        };
        let with = |sizes: Vec<LearnedReport>| {
            Some(Ok(PodReport {
                learned: sizes,
                ..report(&[], 0).unwrap().unwrap()
            }))
        };
        let selection = Selection {
            pods: vec!["a".into(), "b".into()],
            conflicts_with: vec![],
        };
        let status_of = |pool: &ModelPool, a, b| {
            let pods = [
                PodView {
                    name: "a".into(),
                    report: a,
                    injected: true,
                },
                PodView {
                    name: "b".into(),
                    report: b,
                    injected: true,
                },
            ];
            compute(&Inputs {
                pool,
                selection: &selection,
                pods: &pods,
                now: now(100),
                invalid: None,
            })
        };
        let mut pool = pool();
        let status = status_of(
            &pool,
            with(vec![learned(5 << 30, 4 << 30)]),
            with(vec![learned(6 << 30, 4 << 30)]),
        );
        let t2v = status.models[0].learned.clone().expect("learned");
        assert_eq!(
            (t2v.peak_vram_bytes, t2v.declared_vram_bytes),
            (6 << 30, 4 << 30)
        );
        assert_eq!(status.models[1].learned, None, "upscale: nothing measured");
        // Both pods restarted and report nothing yet: the status keeps it.
        pool.status = Some(status);
        let status = status_of(&pool, report(&[], 0), report(&[], 0));
        assert_eq!(status.models[0].learned, Some(t2v.clone()));
        // A smaller peak under the same declared size does not lower it; one learned under a
        // new declared size (the pool was edited) replaces it.
        pool.status = Some(status);
        let status = status_of(&pool, with(vec![learned(1 << 30, 4 << 30)]), None);
        assert_eq!(status.models[0].learned, Some(t2v));
        pool.status = Some(status);
        let status = status_of(&pool, with(vec![learned(3 << 30, 8 << 30)]), None);
        let edited = status.models[0].learned.clone().expect("learned");
        assert_eq!(
            (edited.peak_vram_bytes, edited.declared_vram_bytes),
            (3 << 30, 8 << 30)
        );
    }

    /// `status.models[].sizes`: declared from the spec, the pods' estimate (kept while no pod
    /// reports one, dropped once a size is declared), the largest last measurement the pods
    /// report now, the peak learned.
    #[test]
    fn sizes_side_by_side() {
        use modelpool_crds::report::{EstimateReport, LearnedReport};
        let mut pool: ModelPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
            "metadata": {"name": "video", "namespace": "ns", "generation": 3},
            "spec": {"models": [{"name": "t2v", "vram": "4Gi"}, {"name": "gguf"}, {"name": "none"}]}
        }))
        .unwrap();
        let selection = Selection {
            pods: vec!["a".into(), "b".into()],
            conflicts_with: vec![],
        };
        let gib = |n: u64| n << 30;
        let sizes = |status: &ModelPoolStatus, name: &str| {
            status
                .models
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| m.sizes.clone())
        };
        let size = |vram: u64, ram: u64| SizeBytes {
            vram_bytes: vram,
            ram_bytes: ram,
        };
        let a = PodReport {
            learned: vec![LearnedReport {
                name: "t2v".into(),
                vram: gib(6),
                dvram: gib(4),
                mvram: gib(5),
                ..LearnedReport::default()
            }],
            est: vec![EstimateReport {
                name: "gguf".into(),
                vram: gib(2),
                ram: 0,
            }],
            ..report(&[], 0).unwrap().unwrap()
        };
        let b = PodReport {
            learned: vec![LearnedReport {
                name: "t2v".into(),
                vram: gib(5),
                dvram: gib(4),
                mvram: gib(3),
                ..LearnedReport::default()
            }],
            ..report(&[], 0).unwrap().unwrap()
        };
        let status_of = |pool: &ModelPool, a: PodReport, b: PodReport| {
            let pods = [
                PodView {
                    name: "a".into(),
                    report: Some(Ok(a)),
                    injected: true,
                },
                PodView {
                    name: "b".into(),
                    report: Some(Ok(b)),
                    injected: true,
                },
            ];
            compute(&Inputs {
                pool,
                selection: &selection,
                pods: &pods,
                now: now(100),
                invalid: None,
            })
        };
        let status = status_of(&pool, a, b);
        assert_eq!(
            sizes(&status, "t2v"),
            Some(ModelSizes {
                declared: Some(size(gib(4), 0)),
                estimated: None,
                measured: Some(size(gib(5), 0)),
                peak: Some(size(gib(6), 0)),
            })
        );
        assert_eq!(
            sizes(&status, "gguf"),
            Some(ModelSizes {
                estimated: Some(size(gib(2), 0)),
                ..ModelSizes::default()
            })
        );
        assert_eq!(sizes(&status, "none"), None, "nothing known of it");
        // The pods restart and report nothing yet: the estimate and the peak stay, the last
        // measurement is gone with them.
        pool.status = Some(status);
        let empty = || report(&[], 0).unwrap().unwrap();
        let status = status_of(&pool, empty(), empty());
        assert_eq!(
            sizes(&status, "gguf").and_then(|s| s.estimated),
            Some(size(gib(2), 0))
        );
        let t2v = sizes(&status, "t2v").unwrap();
        assert_eq!((t2v.measured, t2v.peak), (None, Some(size(gib(6), 0))));
        // A size declared for it replaces the estimate.
        pool.spec.models[1].ram = Some(modelpool_crds::Quantity("1Gi".into()));
        pool.status = Some(status);
        let status = status_of(&pool, empty(), empty());
        assert_eq!(
            sizes(&status, "gguf"),
            Some(ModelSizes {
                declared: Some(size(0, gib(1))),
                ..ModelSizes::default()
            })
        );
    }

    /// Issue 15: a pod the pool selects but the webhook never saw (admitted with
    /// `failurePolicy: Ignore` while the operator was down) runs without any ceiling; the pool
    /// says so, naming it.
    #[test]
    fn pods_without_the_sidecar_are_named_in_a_condition() {
        let pool = pool();
        let selection = Selection {
            pods: vec!["a".into(), "stray".into()],
            conflicts_with: vec![],
        };
        let mut pods = vec![
            PodView {
                name: "a".into(),
                report: report(&["t2v"], 1 << 30),
                injected: true,
            },
            PodView {
                name: "stray".into(),
                report: None,
                injected: false,
            },
        ];
        let condition = |pods: &[PodView]| {
            let status = compute(&Inputs {
                pool: &pool,
                selection: &selection,
                pods,
                now: now(100),
                invalid: None,
            });
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == types::SIDECARS_INJECTED)
                .unwrap()
        };
        let ungoverned = condition(&pods);
        assert_eq!(
            (ungoverned.status.as_str(), ungoverned.reason.as_str()),
            ("False", reasons::PODS_WITHOUT_SIDECAR)
        );
        assert!(
            ungoverned.message.contains("1 of 2 selected pods")
                && ungoverned.message.contains("stray")
                && ungoverned.message.contains("failurePolicy: Fail"),
            "{}",
            ungoverned.message
        );
        pods[1].injected = true;
        let governed = condition(&pods);
        assert_eq!(
            (governed.status.as_str(), governed.reason.as_str()),
            ("True", reasons::ALL_PODS_INJECTED)
        );
        assert_eq!(named(&["p"; 12]), "p, p, p, p, p, p, p, p, p, p and 2 more");
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let mut pool = pool();
        let selection = Selection::default();
        let first = compute(&Inputs {
            pool: &pool,
            selection: &selection,
            pods: &[],
            now: now(100),
            invalid: None,
        });
        pool.status = Some(first.clone());
        let second = compute(&Inputs {
            pool: &pool,
            selection: &selection,
            pods: &[],
            now: now(200),
            invalid: None,
        });
        assert_eq!(first, second, "nothing changed, nothing to write");
    }
}

#[cfg(test)]
mod invalid_tests {
    use super::*;

    #[test]
    fn an_invalid_spec_is_not_ready_and_says_why() {
        let pool: ModelPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"models": [{"name": "a"}]}
        }))
        .unwrap();
        let status = compute(&Inputs {
            pool: &pool,
            selection: &Selection::default(),
            pods: &[],
            now: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            invalid: Some("spec.models: pinned models together need 12.0 GiB of vram".into()),
        });
        let ready = find(Some(&status), types::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(ready.message.contains("12.0 GiB"));
    }
}
