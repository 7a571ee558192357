//! SMS providers, one folder each, holding everything that provider
//! knows: how a request is built, how each documented answer is classified
//! (the table in its module doc, each row citing the provider's page), and
//! its fake. What every HTTP provider shares is in [`http`].
//!
//! Adding a provider: a folder here with its `SmsService`, a
//! [`ProviderKind`] variant with its name and public API host, and one arm
//! in [`build`] (plus its dialect in the fake provider).

pub mod africastalking;
pub mod generic;
pub mod http;
pub mod infobip;
pub mod twilio;
pub mod vonage;

use std::sync::Arc;

use crate::config::{Instance, ProviderKind};
use crate::ports::SmsService;

/// Builds the adapter of one configured instance.
pub fn build(instance: &Instance) -> Result<Arc<dyn SmsService>, String> {
    match instance.kind {
        ProviderKind::Generic => Ok(Arc::new(generic::GenericProvider::new(instance)?)),
        ProviderKind::AfricasTalking => Ok(Arc::new(africastalking::AfricasTalkingProvider::new(
            instance,
        )?)),
        ProviderKind::Vonage => Ok(Arc::new(vonage::VonageProvider::new(instance)?)),
        ProviderKind::Infobip => Ok(Arc::new(infobip::InfobipProvider::new(instance)?)),
        ProviderKind::Twilio => Ok(Arc::new(twilio::TwilioProvider::new(instance)?)),
    }
}
