//! SMS providers, one file each. Each classifies every answer into
//! accepted, transient or rejected; the core decides what to do with it.

pub mod generic;

use std::sync::Arc;

use crate::config::{ProviderKind, ProviderSettings};
use crate::ports::SmsService;

/// Builds the provider the settings name.
pub fn build(settings: &ProviderSettings) -> Result<Arc<dyn SmsService>, String> {
    match settings.kind {
        ProviderKind::Generic => Ok(Arc::new(generic::GenericProvider::new(settings)?)),
    }
}
