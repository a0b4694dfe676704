//! Which databases get a delivery worker: the names in `linkhooks.databases`
//! (and in its 0.4.0 form, `linkhooks.database`), comma-separated. None set
//! means every database where the extension is installed.

/// The names listed in any of `lists`; empty when none names one.
pub fn parse(lists: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = lists
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether `database` is served under `names` (from `parse`).
pub fn allows(names: &[String], database: &str) -> bool {
    names.is_empty() || names.iter().any(|name| name == database)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_set_serves_every_database() {
        let names = parse(&["", " , "]);
        assert!(names.is_empty());
        assert!(allows(&names, "app"));
    }

    #[test]
    fn a_list_serves_only_its_names_from_both_settings() {
        let names = parse(&["app, crm", "legacy"]);
        assert_eq!(names, ["app", "crm", "legacy"]);
        assert!(allows(&names, "crm") && allows(&names, "legacy"));
        assert!(!allows(&names, "postgres"));
        assert!(!allows(&names, "App"), "database names are case-sensitive");
    }

    #[test]
    fn a_name_in_both_settings_is_listed_once() {
        assert_eq!(parse(&["app", "app,app"]), ["app"]);
    }
}
