//! rules: checks each rule's kind, scope and settings when it is written.

use super::*;

#[pg_trigger]
fn rules_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
    if let Some(row) = restored_row(trigger) {
        return Ok(row);
    }
    Ok(Some(on_rule(trigger).or_report()))
}

fn on_rule<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    let mut new = new_row(trigger)?;
    let kind: String = col(&new, "kind")?.unwrap_or_default();
    let link_id: Option<i64> = col(&new, "link_id")?;
    let campaign: Option<String> = col(&new, "campaign")?;
    let settings = col::<JsonB>(&new, "settings")?.map_or(Value::Null, |j| j.0);
    limits::check_json("settings", &settings, MAX_JSON_BYTES)?;
    rules::check(&kind, link_id.is_some(), campaign.is_some(), &settings)?;
    if let Some(id) = link_id
        && LinkRow::by_id(id)?.is_none()
    {
        return Err(Error::NotFound(format!(
            "invalid link_id: link {id} does not exist"
        )));
    }
    if matches!(trigger.op(), Ok(PgTriggerOperation::Update)) {
        set(&mut new, "updated_at", transaction_now())?;
    }
    Ok(new)
}
