//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both write
//! status. Optimistic concurrency does the work: a replica takes or renews the Lease with a
//! `replace` carrying the `resourceVersion` it read, and a conflict means someone else won.
//!
//! A leader that cannot renew for a whole lease duration steps down by exiting (the
//! Deployment restarts it as a follower), the usual client-go behaviour.
//!
//! With an owner (the operator's Deployment), the Lease carries an owner reference to it, set
//! when the Lease is created and added by the leader to a Lease that lacks it (one made by an
//! older version), so that the garbage collector deletes the Lease with the Deployment.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct Election {
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews (and followers retry).
    pub retry_period: Duration,
    /// The object whose deletion deletes the Lease (the operator's Deployment), if any.
    pub owner: Option<OwnerReference>,
}

/// Runs the election forever, publishing leadership on `leader`. Returns only when
/// leadership is lost for good (the caller should exit).
pub async fn run(client: Client, election: Election, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &election.namespace);
    let mut last_renewed: Option<std::time::Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &election).await {
            Ok(true) => {
                if !*leader.borrow() {
                    tracing::info!(identity = %election.identity, lease = %election.lease_name, "became leader");
                }
                last_renewed = Some(std::time::Instant::now());
                let _ = leader.send(true);
            }
            Ok(false) => {
                if *leader.borrow() {
                    tracing::warn!(identity = %election.identity, "lost the lease to another replica");
                    let _ = leader.send(false);
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "failed to renew the leader lease");
                if *leader.borrow()
                    && last_renewed.is_some_and(|t| t.elapsed() >= election.lease_duration)
                {
                    tracing::error!(
                        "could not renew the lease for a whole lease duration: stepping down"
                    );
                    let _ = leader.send(false);
                    return;
                }
            }
        }
        tokio::time::sleep(election.retry_period).await;
    }
}

/// Puts `owner` among `meta`'s owner references, replacing a reference to an earlier object
/// of the same kind and name (a Deployment deleted and created again). Returns whether it
/// changed anything.
pub fn with_owner(meta: &mut ObjectMeta, owner: &OwnerReference) -> bool {
    let refs = meta.owner_references.get_or_insert_with(Vec::new);
    if refs.iter().any(|r| r.uid == owner.uid) {
        return false;
    }
    refs.retain(|r| {
        !(r.kind == owner.kind && r.api_version == owner.api_version && r.name == owner.name)
    });
    refs.push(owner.clone());
    true
}

async fn try_acquire_or_renew(api: &Api<Lease>, election: &Election) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let duration_s = i32::try_from(election.lease_duration.as_secs())
        .unwrap_or(i32::MAX)
        .max(1);
    let Some(mut lease) = api.get_opt(&election.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(election.lease_name.clone()),
                namespace: Some(election.namespace.clone()),
                owner_references: election.owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(election.identity.clone()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mine = holder == election.identity;
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(seconds)) => {
            let until = renewed.0.as_millisecond() + i64::from(seconds) * 1000;
            now.as_millisecond() > until
        }
        _ => true,
    };
    if !mine && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(election.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration_s);
    spec.renew_time = Some(MicroTime(now));
    if let Some(owner) = &election.owner {
        with_owner(&mut lease.metadata, owner);
    }
    match api
        .replace(&election.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "mp-modelpool-operator".into(),
            uid: uid.into(),
            ..OwnerReference::default()
        }
    }

    /// Catches an adopted object collecting a reference per renewal, or keeping a reference to
    /// a deleted Deployment (the garbage collector would delete the object with the old one).
    #[test]
    fn with_owner_adds_once_and_replaces_a_stale_reference() {
        let mut meta = ObjectMeta::default();
        assert!(with_owner(&mut meta, &owner("a")));
        assert!(!with_owner(&mut meta, &owner("a")));
        assert_eq!(meta.owner_references.as_deref(), Some(&[owner("a")][..]));
        let other = OwnerReference {
            kind: "ModelPool".into(),
            ..owner("x")
        };
        meta.owner_references
            .get_or_insert_with(Vec::new)
            .push(other.clone());
        assert!(with_owner(&mut meta, &owner("b")));
        assert_eq!(
            meta.owner_references.as_deref(),
            Some(&[other, owner("b")][..])
        );
    }
}
