//! What the deployer remembers about each service besides its active
//! upstream: the warm previous colour, the deployed images, the last
//! deploy, the container a running deploy is creating, the bake window
//! running. Persisted with every snapshot write (see
//! [`Writer::persist`](crate::control::writer::Writer::persist)).
//!
//! Read by anyone in the control plane; changed only inside
//! [`deploy`](super), through [`Deployer::commit`](super::Deployer::commit)
//! and its activating twin, so every change is saved.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::control::state::{BakeState, DeployRecord, PreviousState, State};

/// One service's record.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ServiceRecord {
    pub previous: Option<PreviousState>,
    pub history: Vec<String>,
    pub last_deploy: Option<DeployRecord>,
    /// The container a running deploy is creating (see `State::starting`).
    pub starting: Option<String>,
    /// The bake window running, for a restart to resume.
    pub bake: Option<BakeState>,
}

/// Every service's record.
#[derive(Debug, Default)]
pub(crate) struct Records {
    by_service: Mutex<HashMap<String, ServiceRecord>>,
}

impl Records {
    /// A copy of the service's record.
    pub(crate) fn get(&self, service: &str) -> ServiceRecord {
        self.by_service
            .lock()
            .map(|records| records.get(service).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Per service, the container a deploy is creating (for the state file).
    pub(crate) fn starting(&self) -> BTreeMap<String, String> {
        self.by_service
            .lock()
            .map(|records| {
                records
                    .iter()
                    .filter_map(|(name, r)| Some((name.clone(), r.starting.clone()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The bake windows recorded, by service.
    pub(crate) fn bakes(&self) -> Vec<(String, BakeState)> {
        self.by_service
            .lock()
            .map(|records| {
                records
                    .iter()
                    .filter_map(|(name, r)| Some((name.clone(), r.bake.clone()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes the service's record in memory; [`Deployer`](super::Deployer)
    /// saves it.
    pub(super) fn update(&self, service: &str, change: impl FnOnce(&mut ServiceRecord)) {
        if let Ok(mut records) = self.by_service.lock() {
            change(records.entry(service.to_string()).or_default());
        }
    }

    /// The records the state file had at start-up, for the services the
    /// config still names.
    pub(super) fn restore(&self, state: &State, known: impl Fn(&str) -> bool) {
        for (name, saved) in state.services.iter().filter(|(name, _)| known(name)) {
            self.update(name, |record| {
                *record = ServiceRecord {
                    previous: saved.previous.clone(),
                    history: saved.history.clone(),
                    last_deploy: saved.last_deploy.clone(),
                    starting: None,
                    bake: saved.bake.clone(),
                }
            });
        }
        for (name, container) in state.starting.iter().filter(|(name, _)| known(name)) {
            self.update(name, |record| record.starting = Some(container.clone()));
        }
    }
}
