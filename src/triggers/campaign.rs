//! campaigns: validates and keeps goal counters; campaign.completed.

use super::*;

#[pg_trigger]
fn campaigns_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
    if let Some(row) = restored_row(trigger) {
        return Ok(row);
    }
    Ok(Some(on_campaign(trigger).or_report()))
}

fn on_campaign<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    let op = trigger.op().map_err(|e| Error::Column(e.to_string()))?;
    if matches!(op, PgTriggerOperation::Delete) {
        shared::config_changed();
        return old_row(trigger);
    }
    let mut new = new_row(trigger)?;
    let name: String = col(&new, "name")?.unwrap_or_default();
    if name.trim().is_empty() {
        return Err(Error::invalid("name", "must not be empty"));
    }
    limits::check_text("name", &name, MAX_TEXT_CHARS)?;
    check_finite(&new, "ends_at", "NULL: the campaign has no end")?;
    let goal: Option<i64> = col(&new, "click_goal")?;
    if let Some(g) = goal.filter(|g| *g <= 0) {
        return Err(Error::invalid(
            "click_goal",
            format!("must be greater than 0 (got {g})"),
        ));
    }
    let goal_changed = match op {
        PgTriggerOperation::Update => {
            let old = old_row(trigger)?;
            let changed = changed_fields(
                &old,
                &new,
                &["name", "click_goal", "ends_at", "completed_at"],
            )?;
            if changed.is_empty() {
                return Ok(new); // a click counted toward the goal
            }
            changed.iter().any(|f| *f == "name" || *f == "click_goal")
        }
        _ => true,
    };
    if goal_changed && goal.is_some() {
        let count = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM linkhooks.clicks c JOIN linkhooks.links l ON l.id = c.link_id WHERE l.campaign = $1",
            &[name.as_str().into()],
        )?
        .unwrap_or(0);
        set(&mut new, "click_count", count)?;
    }
    shared::config_changed();
    Ok(new)
}

pub fn emit_campaign_completed(campaign: CampaignPayload) -> Result<()> {
    let id = new_event_id();
    let name = campaign.name.clone();
    let body = payload::envelope(
        &id,
        EventType::CampaignCompleted,
        unix_now_micros(),
        CampaignData { campaign },
    );
    let facts = Facts {
        campaign: Some(&name),
        tags: &[],
        click: None,
        milestone: None,
    };
    events::emit(EventType::CampaignCompleted, &id, &facts, |_| body.clone())?;
    Ok(())
}
