//! Checks the schema cannot express, mirrored from the CRD's CEL rules but with the numbers:
//! a pool read from a file gets the same verdict the apiserver would give, explained.

use std::{collections::HashSet, fmt};

use crate::{
    quantity::{Quantity, human_bytes},
    v1alpha1::{DriverKind, MAX_MODELS, Mode, ModelPool},
};

/// One problem, located by its path in the manifest (`spec.models[1].vram`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the offending field.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in one manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("; "))
    }
}

/// A model's declared needs, in bytes, after the quantities parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// GPU bytes.
    pub vram: u64,
    /// Host bytes.
    pub ram: u64,
}

fn quantity_bytes(
    errors: &mut Vec<FieldError>,
    field: String,
    quantity: Option<&Quantity>,
) -> Option<u64> {
    let quantity = quantity?;
    match quantity.bytes() {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            errors.push(FieldError::new(field, error.to_string()));
            None
        }
    }
}

fn is_model_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(edge_ok)
        && bytes.last().is_some_and(edge_ok)
        && bytes.iter().all(|b| edge_ok(b) || *b == b'-' || *b == b'_')
}

/// Validates a pool the way the CRD's schema and CEL rules would, and more: every error names
/// the field and gives the numbers.
pub fn validate_pool(pool: &ModelPool) -> Result<(), FieldErrors> {
    let mut errors = Vec::new();
    let spec = &pool.spec;

    match pool.metadata.name.as_deref() {
        None | Some("") => errors.push(FieldError::new(
            "metadata.name",
            "is required (the pool's name)",
        )),
        Some(name) if !is_dns_subdomain(name) => errors.push(FieldError::new(
            "metadata.name",
            format!(
                "{name:?} is not a valid name (lowercase letters, digits, '-' and '.', at most 253)"
            ),
        )),
        Some(_) => {}
    }

    let limit_vram = quantity_bytes(
        &mut errors,
        "spec.limits.vram".into(),
        spec.limits.vram.as_ref(),
    );
    let limit_ram = quantity_bytes(
        &mut errors,
        "spec.limits.ram".into(),
        spec.limits.ram.as_ref(),
    );
    quantity_bytes(
        &mut errors,
        "spec.baseline.vram".into(),
        spec.baseline.vram.as_ref(),
    );
    quantity_bytes(
        &mut errors,
        "spec.baseline.ram".into(),
        spec.baseline.ram.as_ref(),
    );

    if spec.models.is_empty() {
        errors.push(FieldError::new(
            "spec.models",
            "must list at least one model",
        ));
    }
    if spec.models.len() > MAX_MODELS {
        errors.push(FieldError::new(
            "spec.models",
            format!(
                "lists {} models, at most {MAX_MODELS} are allowed",
                spec.models.len()
            ),
        ));
    }

    let mut seen = HashSet::new();
    let (mut pinned_vram, mut pinned_ram) = (0u64, 0u64);
    for (index, model) in spec.models.iter().enumerate() {
        let at = format!("spec.models[{index}]");
        if !is_model_name(&model.name) {
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is not a valid model name (lowercase letters, digits, '-' or '_', starting and ending with a letter or digit, at most 63)",
                    model.name
                ),
            ));
        }
        if !seen.insert(model.name.as_str()) {
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is listed twice (model names must be unique)",
                    model.name
                ),
            ));
        }
        let vram = quantity_bytes(&mut errors, format!("{at}.vram"), model.vram.as_ref());
        let ram = quantity_bytes(&mut errors, format!("{at}.ram"), model.ram.as_ref());
        for (need, limit, resource) in [(vram, limit_vram, "vram"), (ram, limit_ram, "ram")] {
            if let (Some(need), Some(limit)) = (need, limit)
                && need > limit
            {
                errors.push(FieldError::new(
                    format!("{at}.{resource}"),
                    format!(
                        "model {:?} needs {} of {resource}, more than the pool's ceiling spec.limits.{resource} = {}",
                        model.name,
                        human_bytes(need),
                        human_bytes(limit)
                    ),
                ));
            }
        }
        if model.pinned {
            pinned_vram = pinned_vram.saturating_add(vram.unwrap_or(0));
            pinned_ram = pinned_ram.saturating_add(ram.unwrap_or(0));
        }
        if let Some(seconds) = model.load_seconds
            && !(seconds.is_finite() && seconds >= 0.0)
        {
            errors.push(FieldError::new(
                format!("{at}.loadSeconds"),
                format!("{seconds} is not a number of seconds >= 0"),
            ));
        }
    }
    for (pinned, limit, resource) in [
        (pinned_vram, limit_vram, "vram"),
        (pinned_ram, limit_ram, "ram"),
    ] {
        if let Some(limit) = limit
            && pinned > limit
        {
            errors.push(FieldError::new(
                "spec.models",
                format!(
                    "pinned models together need {} of {resource}, more than spec.limits.{resource} = {}",
                    human_bytes(pinned),
                    human_bytes(limit)
                ),
            ));
        }
    }

    match spec.driver.url.as_deref() {
        None if spec.driver.kind.needs_url() => errors.push(FieldError::new(
            "spec.driver.url",
            format!(
                "is required when spec.driver.kind is {} (e.g. http://127.0.0.1:8000)",
                spec.driver.kind.as_str()
            ),
        )),
        Some(url) if !url.starts_with("http://") => {
            errors.push(FieldError::new(
                "spec.driver.url",
                format!(
                    "{url:?} must start with http:// (the model server runs in the same pod; the sidecar does not speak https)"
                ),
            ));
        }
        None | Some(_) => {}
    }

    // One model without `servers`: its server is the driver's url (or the pod's vLLM
    // container, or port 8000).
    let vllm_single = spec.driver.servers.is_none() && spec.models.len() == 1;
    if spec.driver.kind == DriverKind::Vllm && !vllm_single {
        let servers = spec.driver.servers.clone().unwrap_or_default();
        for model in &spec.models {
            match servers.get(&model.name) {
                None => errors.push(FieldError::new(
                    "spec.driver.servers",
                    format!(
                        "names no vLLM server for model {:?} (driver.kind Vllm: one server per model, e.g. {{{}: \"http://127.0.0.1:8001\"}})",
                        model.name, model.name
                    ),
                )),
                Some(url) if !url.starts_with("http://") => errors.push(FieldError::new(
                    format!("spec.driver.servers.{}", model.name),
                    format!("{url:?} must start with http://"),
                )),
                Some(_) => {}
            }
        }
        for name in servers.keys() {
            if !spec.models.iter().any(|m| m.name == *name) {
                errors.push(FieldError::new(
                    format!("spec.driver.servers.{name}"),
                    "names a model the pool does not list".to_owned(),
                ));
            }
        }
    }

    if let Some(proxy) = &spec.proxy {
        if spec.driver.kind == DriverKind::Sdk {
            errors.push(FieldError::new(
                "spec.proxy",
                "needs a driver that loads models itself (Http, KServeV2, Ollama, Vllm): with driver.kind Sdk the app loads its models, and a proxied request has no app to load for it".to_owned(),
            ));
        }
        if !(1..=65535).contains(&proxy.port) || proxy.port == 9464 {
            errors.push(FieldError::new(
                "spec.proxy.port",
                format!(
                    "{} must be between 1 and 65535 and not 9464 (the sidecar's metrics port)",
                    proxy.port
                ),
            ));
        }
        if let Some(url) = proxy.upstream.as_deref()
            && !url.starts_with("http://")
        {
            errors.push(FieldError::new(
                "spec.proxy.upstream",
                format!("{url:?} must start with http:// (the server is in the same pod)"),
            ));
        }
    }

    let policy = &spec.policy;
    for (value, field) in [
        (
            policy.pressure.vram_percent,
            "spec.policy.pressure.vramPercent",
        ),
        (
            policy.pressure.ram_percent,
            "spec.policy.pressure.ramPercent",
        ),
    ] {
        if !(1..=100).contains(&value) {
            errors.push(FieldError::new(
                field,
                format!("{value} must be between 1 and 100"),
            ));
        }
    }
    if policy.idle_ttl.is_negative()
        || (policy.mode == Mode::Cache && std::time::Duration::from(policy.idle_ttl).is_zero())
    {
        errors.push(FieldError::new(
            "spec.policy.idleTTL",
            format!(
                "{} must be a positive duration in Cache mode (e.g. 5m)",
                policy.idle_ttl
            ),
        ));
    }
    if policy.acquire_timeout.is_negative() {
        errors.push(FieldError::new(
            "spec.policy.acquireTimeout",
            format!("{} must not be negative (e.g. 60s)", policy.acquire_timeout),
        ));
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(FieldErrors(errors))
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b.first().is_some_and(u8::is_ascii_alphanumeric)
                && b.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

/// The declared needs of each model, in bytes (absent sizes count as 0).
pub fn declared_needs(pool: &ModelPool) -> Result<Vec<(String, Needs)>, FieldErrors> {
    validate_pool(pool)?;
    Ok(pool
        .spec
        .models
        .iter()
        .map(|m| {
            let bytes = |q: &Option<Quantity>| q.as_ref().and_then(|q| q.bytes().ok()).unwrap_or(0);
            (
                m.name.clone(),
                Needs {
                    vram: bytes(&m.vram),
                    ram: bytes(&m.ram),
                },
            )
        })
        .collect())
}
