//! Operational events: `subscription.disabled` and `delivery.dead`, emitted
//! by the worker in the transaction that records the outcome, to the
//! subscriptions that ask for them by name (an operations endpoint).

use crate::error::Result;
use crate::events::{self, new_event_id, unix_now_micros};
use crate::filters::Facts;
use crate::payload::{
    self, DeadDelivery, DeliveryDeadData, DisabledSubscription, EventType, SubscriptionDisabledData,
};

/// Nothing about a link or click: filters on campaign or tags never match these.
const NO_FACTS: Facts<'static> = Facts {
    campaign: None,
    tags: &[],
    click: None,
    milestone: None,
};

pub fn subscription_disabled(subscription: DisabledSubscription) -> Result<()> {
    let id = new_event_id().to_string();
    let kind = EventType::SubscriptionDisabled;
    let body = payload::envelope(
        &id,
        kind,
        unix_now_micros(),
        SubscriptionDisabledData { subscription },
    );
    events::emit(kind, &id, &NO_FACTS, |_| body.clone())?;
    Ok(())
}

pub fn delivery_dead(delivery: DeadDelivery) -> Result<()> {
    // A dead operational event announces nothing: an operations endpoint that is
    // down must not feed itself a new event for each one it misses.
    if EventType::parse(&delivery.event_type).is_some_and(EventType::operational) {
        return Ok(());
    }
    let id = new_event_id().to_string();
    let kind = EventType::DeliveryDead;
    let body = payload::envelope(&id, kind, unix_now_micros(), DeliveryDeadData { delivery });
    events::emit(kind, &id, &NO_FACTS, |_| body.clone())?;
    Ok(())
}
