//! Who may call what: the `[auth]` policy for `kiln serve`, and `kiln token create | list |
//! revoke`, which edit the token file the server re-reads when it changes.

use crate::cli::TokenCommand;
use anyhow::Context;
use kiln_auth::policy::{CertificateRule, Settings};
use kiln_auth::tokens::Tokens;
use kiln_auth::{Grant, Policy, Role};
use kiln_config::Config;
use std::path::PathBuf;
use std::sync::Arc;

/// The token file of a configuration.
pub fn tokens_file(config: &Config) -> PathBuf {
    config
        .auth
        .tokens_file
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("auth/tokens.toml"))
}

pub fn roles(names: &[String], what: &str) -> anyhow::Result<Vec<Role>> {
    names
        .iter()
        .flat_map(|n| n.split(','))
        .filter(|n| !n.trim().is_empty())
        .map(|n| Role::parse(n.trim()).map_err(|e| anyhow::anyhow!("{what}: {e}")))
        .collect()
}

/// The policy `[auth]` describes.
pub fn policy(config: &Config) -> anyhow::Result<Arc<Policy>> {
    if !config.auth.enabled {
        return Ok(Arc::new(Policy::disabled()));
    }
    let certificates = config
        .auth
        .certificates
        .iter()
        .map(|c| {
            let rule_roles = roles(&c.roles, &format!("auth.certificates {:?}", c.name))?;
            if let Some(role) = Role::scoped_farm_wide(&rule_roles, &c.instances) {
                anyhow::bail!(
                    "auth.certificates {:?}: the {} role cannot be limited to instances (it covers the whole farm)",
                    c.name,
                    role.name()
                );
            }
            Ok(CertificateRule {
                name: c.name.clone(),
                grants: Grant::all(&rule_roles, &c.instances),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = Settings {
        enabled: true,
        tokens_file: tokens_file(config),
        certificates,
        anonymous: Grant::all(
            &roles(&config.auth.anonymous_roles, "auth.anonymous_roles")?,
            &[],
        ),
        enrolment_file: crate::enrol::enrolment_file(config),
    };
    Ok(Arc::new(
        Policy::open(settings).context("cannot read the token file")?,
    ))
}

/// `kiln token …`.
pub fn token(command: TokenCommand) -> anyhow::Result<()> {
    let load = crate::serve::server_config;
    match command {
        TokenCommand::Create {
            args,
            name,
            role,
            instance,
        } => {
            let config = load(&args)?;
            let roles = roles(&role, "--role")?;
            anyhow::ensure!(!roles.is_empty(), "give the token at least one --role");
            let file = tokens_file(&config);
            let secret = Tokens::create(&file, &name, &roles, &instance)?;
            eprintln!(
                "token {name:?} created in {} (shown once; the file keeps only its hash):",
                file.display()
            );
            println!("{secret}");
        }
        TokenCommand::List { args } => {
            let config = load(&args)?;
            for t in Tokens::list(&tokens_file(&config))? {
                let roles: Vec<&str> = t.roles.iter().map(|r| r.name()).collect();
                let instances = if t.instances.is_empty() {
                    "all instances".to_string()
                } else {
                    t.instances.join(",")
                };
                println!("{}\t{}\t{}", t.name, roles.join(","), instances);
            }
        }
        TokenCommand::Revoke { args, name } => {
            let config = load(&args)?;
            Tokens::revoke(&tokens_file(&config), &name)?;
            eprintln!("token {name:?} revoked; the server stops accepting it within seconds");
        }
    }
    Ok(())
}

/// Re-reads the token file every second, off the data plane, until the process ends.
pub async fn reload_loop(policy: Arc<Policy>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let p = policy.clone();
        let _ = tokio::task::spawn_blocking(move || p.reload_if_changed()).await;
    }
}
