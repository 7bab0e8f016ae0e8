//! The webhook's serving certificate: a small CA and a leaf for the webhook Service's DNS
//! names (and loopback, for tests), kept in a Secret so every replica serves the same one.
//!
//! The leader creates the Secret when missing and rotates it when it has less than
//! [`ROTATE_BEFORE`] left, and patches the MutatingWebhookConfiguration's `caBundle`. Every
//! replica reloads the Secret's cert into its TLS acceptor. With an owner (the operator's
//! Deployment), the Secret carries an owner reference to it, so that the garbage collector
//! deletes it with the Deployment. With `--tls-cert-file` (e.g.
//! cert-manager), none of this runs: the files are served and reloaded when they change.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Validity of a generated leaf.
pub const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Rotate when less than this is left.
pub const ROTATE_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Annotation on the Secret with the leaf's expiry (unix seconds).
pub const NOT_AFTER_ANNOTATION: &str = "modelpool.io/not-after";

/// Errors of certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen failed.
    #[error("failed to generate the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM did not parse.
    #[error("failed to parse the webhook certificate or key: {0}")]
    Pem(String),
    /// rustls refused the key.
    #[error("failed to load the webhook key into TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The apiserver refused a read or write.
    #[error("failed to {action}: {source}")]
    Kube {
        /// What was attempted.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Reading cert files failed.
    #[error("failed to read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A CA and a leaf, PEM encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The CA certificate (the webhook's `caBundle`).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving key.
    pub key_pem: String,
    /// When the leaf expires (unix seconds).
    pub not_after: i64,
}

/// Generates a CA and a leaf valid for `names` (DNS names or IP addresses).
pub fn generate(names: &[String]) -> Result<Bundle, Error> {
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + VALIDITY;

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "modelpool-webhook-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = not_after + time::Duration::days(1);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = not_after;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(Bundle {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
        not_after: not_after.unix_timestamp(),
    })
}

/// A TLS certificate resolver whose certificate can be swapped while serving.
#[derive(Debug, Default)]
pub struct SwappableCert {
    current: std::sync::RwLock<Option<Arc<CertifiedKey>>>,
}

impl SwappableCert {
    /// Installs a new certificate and key (PEM).
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Pem(e.to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain, key, &provider)?;
        if let Ok(mut slot) = self.current.write() {
            *slot = Some(Arc::new(certified));
        }
        Ok(())
    }

    /// Whether a certificate is installed.
    pub fn is_ready(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
}

fn secret_bundle(secret: &Secret) -> Option<Bundle> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(Bundle {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after: secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NOT_AFTER_ANNOTATION))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

/// Reads the Secret's bundle, if present.
pub async fn read_secret(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Bundle>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get_opt(name).await.map_err(|source| Error::Kube {
        action: format!("read secret {namespace}/{name}"),
        source,
    })?;
    Ok(secret.as_ref().and_then(secret_bundle))
}

/// Leader's duty: make sure the Secret holds a bundle with time left (and the owner reference
/// to `owner`, when given), and that the webhook configuration trusts its CA. Returns the
/// bundle in force.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    secret_name: &str,
    names: &[String],
    webhook_config: Option<&str>,
    owner: Option<&OwnerReference>,
) -> Result<Bundle, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(secret_name)
        .await
        .map_err(|source| Error::Kube {
            action: format!("read secret {namespace}/{secret_name}"),
            source,
        })?;
    let existing = secret.as_ref().and_then(secret_bundle);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let rotate_before = i64::try_from(ROTATE_BEFORE.as_secs()).unwrap_or(i64::MAX);
    let bundle = match existing {
        Some(bundle) if bundle.not_after - now > rotate_before => {
            // Adopt a Secret made without the owner (by an older version).
            if let (Some(owner), Some(secret)) = (owner, secret) {
                let mut meta = secret.metadata;
                if crate::leader::with_owner(&mut meta, owner) {
                    let patch = serde_json::json!({
                        "metadata": {
                            "ownerReferences": meta.owner_references,
                            "resourceVersion": meta.resource_version,
                        }
                    });
                    api.patch(secret_name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|source| Error::Kube {
                            action: format!("set the owner of secret {namespace}/{secret_name}"),
                            source,
                        })?;
                    tracing::info!(
                        secret = secret_name,
                        owner = %owner.name,
                        "the webhook certificate Secret is now owned by the operator's Deployment"
                    );
                }
            }
            bundle
        }
        previous => {
            let bundle = generate(names)?;
            tracing::info!(
                secret = secret_name,
                rotated = previous.is_some(),
                "generated the webhook serving certificate"
            );
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(secret_name.into()),
                    namespace: Some(namespace.into()),
                    owner_references: owner.map(|o| vec![o.clone()]),
                    annotations: Some(BTreeMap::from([(
                        NOT_AFTER_ANNOTATION.into(),
                        bundle.not_after.to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(BTreeMap::from([
                    (
                        "ca.crt".into(),
                        ByteString(bundle.ca_pem.clone().into_bytes()),
                    ),
                    (
                        "tls.crt".into(),
                        ByteString(bundle.cert_pem.clone().into_bytes()),
                    ),
                    (
                        "tls.key".into(),
                        ByteString(bundle.key_pem.clone().into_bytes()),
                    ),
                ])),
                ..Secret::default()
            };
            let params = PatchParams::apply(crate::FIELD_MANAGER).force();
            let result = api
                .patch(secret_name, &params, &Patch::Apply(&secret))
                .await;
            if let Err(kube::Error::Api(status)) = &result
                && status.code == 404
            {
                api.create(&PostParams::default(), &secret)
                    .await
                    .map_err(|source| Error::Kube {
                        action: format!("create secret {namespace}/{secret_name}"),
                        source,
                    })?;
            } else {
                result.map_err(|source| Error::Kube {
                    action: format!("write secret {namespace}/{secret_name}"),
                    source,
                })?;
            }
            bundle
        }
    };
    if let Some(config) = webhook_config {
        patch_ca_bundle(client, config, &bundle.ca_pem).await?;
    }
    Ok(bundle)
}

/// Sets `caBundle` on every webhook of a MutatingWebhookConfiguration (when it differs).
pub async fn patch_ca_bundle(client: &Client, config: &str, ca_pem: &str) -> Result<(), Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = api.get(config).await.map_err(|source| Error::Kube {
        action: format!("read mutatingwebhookconfiguration {config}"),
        source,
    })?;
    let wanted = ByteString(ca_pem.as_bytes().to_vec());
    let webhooks = current.webhooks.unwrap_or_default();
    if webhooks
        .iter()
        .all(|w| w.client_config.ca_bundle.as_ref() == Some(&wanted))
    {
        return Ok(());
    }
    let patch: Vec<serde_json::Value> = (0..webhooks.len())
        .map(|i| {
            serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": wanted,
            })
        })
        .collect();
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(patch))
        .map_err(|e| Error::Pem(e.to_string()))?;
    api.patch(config, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map_err(|source| Error::Kube {
            action: format!("patch caBundle of {config}"),
            source,
        })?;
    tracing::info!(config, "webhook caBundle updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bundle_loads_into_tls() {
        let bundle = generate(&["modelpool-webhook.ns.svc".into(), "127.0.0.1".into()]).unwrap();
        assert!(bundle.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let cert = SwappableCert::default();
        assert!(!cert.is_ready());
        cert.set(&bundle.cert_pem, &bundle.key_pem).unwrap();
        assert!(cert.is_ready());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(bundle.not_after - now > 364 * 24 * 3600);
    }
}
