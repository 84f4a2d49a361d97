//! Every schema in schemas/ is held to the compatibility policy of docs/schemas.md against every
//! earlier version in schemas/history/ (transitively: each version against each later one):
//!
//! - BACKWARD: the newer schema reads everything the older one wrote (Avro resolution rules);
//! - FORWARD except additions: the older schema reads what the newer one writes, unless the
//!   record uses a new enum symbol or union branch (documented: upgrade consumers first);
//! - additive: named types, fields and union branches are kept, new fields have defaults, enum
//!   symbols are only appended.
//!
//! Candidates for the next version (tests/interop/schemas/) must be FULL: both directions clean.
//!
//! Families: payment-command, payment-status, and consent-status (one version so far: nothing
//! to compare it with yet, but it is registered and readable like the others).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pis_worker::contract::compat::{Parsed, can_read, policy_problems};
use pis_worker::contract::{SchemaRole, canonical, schemas};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Families published before the consent status schema: each has a history.
const WITH_HISTORY: [&str; 2] = ["payment-command", "payment-status"];

/// The role of a family's records.
fn role_of(family: &str) -> SchemaRole {
    match family {
        "payment-command" => SchemaRole::Command,
        "payment-status" => SchemaRole::Status,
        "consent-status" => SchemaRole::ConsentStatus,
        other => panic!("unexpected schema family {other}"),
    }
}

/// Every schema family of schemas/ with its versions, oldest first, the current one last.
fn families() -> BTreeMap<String, Vec<(String, String)>> {
    numbered_families()
        .into_iter()
        .map(|(family, versions)| {
            (
                family,
                versions.into_iter().map(|(_, f, j)| (f, j)).collect(),
            )
        })
        .collect()
}

/// [`families`] with each history version's number (`u32::MAX` for the current schema).
fn numbered_families() -> BTreeMap<String, Vec<(u32, String, String)>> {
    let mut out: BTreeMap<String, Vec<(u32, String, String)>> = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("schemas")).expect("schemas dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "avsc") {
            let family = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("name")
                .to_owned();
            out.entry(family.clone()).or_default().push((
                u32::MAX,
                format!("{family}.avsc"),
                read(&path),
            ));
        }
    }
    for entry in std::fs::read_dir(root().join("schemas/history")).expect("history dir") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("name")
            .to_owned();
        let (family, rest) = file
            .split_once(".v")
            .unwrap_or_else(|| panic!("{file}: history files are <family>.v<N>.avsc"));
        let version: u32 = rest
            .trim_end_matches(".avsc")
            .parse()
            .unwrap_or_else(|_| panic!("{file}: no version number"));
        let versions = out
            .get_mut(family)
            .unwrap_or_else(|| panic!("{file}: no schemas/{family}.avsc"));
        versions.push((version, file.clone(), read(&path)));
    }
    for versions in out.values_mut() {
        versions.sort_by_key(|(v, _, _)| *v);
    }
    out
}

/// History files are numbered 1, 2, 3... without gaps, and the compiled-in history lists the
/// same versions in the same order: publishing a version means both (docs/schemas.md).
#[test]
fn history_versions_are_numbered_without_gaps_and_compiled_in() {
    use pis_worker::contract::{
        COMMAND_SCHEMA_HISTORY, CONSENT_STATUS_SCHEMA_HISTORY, STATUS_SCHEMA_HISTORY,
    };
    let families = numbered_families();
    assert_eq!(
        families.keys().map(String::as_str).collect::<Vec<_>>(),
        ["consent-status", "payment-command", "payment-status"]
    );
    for (family, versions) in families {
        let history: Vec<u32> = versions
            .iter()
            .map(|(v, _, _)| *v)
            .filter(|v| *v != u32::MAX)
            .collect();
        let expected: Vec<u32> = (1..=history.len() as u32).collect();
        assert_eq!(history, expected, "{family}: history numbering");
        let compiled = match role_of(&family) {
            SchemaRole::Command => COMMAND_SCHEMA_HISTORY,
            SchemaRole::Status => STATUS_SCHEMA_HISTORY,
            SchemaRole::ConsentStatus => CONSENT_STATUS_SCHEMA_HISTORY,
        };
        let files: Vec<&str> = versions
            .iter()
            .filter(|(v, _, _)| *v != u32::MAX)
            .map(|(_, _, json)| json.as_str())
            .collect();
        let built_in: Vec<&str> = compiled.iter().map(|(_, json)| *json).collect();
        assert_eq!(files, built_in, "{family}: compiled-in history");
    }
}

#[test]
fn every_schema_keeps_the_policy_with_every_earlier_version() {
    let mut checked = 0;
    for (family, versions) in families() {
        if WITH_HISTORY.contains(&family.as_str()) {
            assert!(versions.len() >= 2, "{family} has a history");
        }
        for (i, (old_name, old)) in versions.iter().enumerate() {
            for (new_name, new) in &versions[i + 1..] {
                let problems = policy_problems(old, new).expect("schemas parse");
                assert!(
                    problems.is_empty(),
                    "{old_name} -> {new_name}: {problems:#?}"
                );
                checked += 1;
            }
        }
    }
    // Transitively: command v1..v4 and the current (10 pairs), status v1, v2 and the current (3).
    assert!(
        checked >= 13,
        "every schema against its history: {checked} pairs"
    );
}

/// A reader of each published version is compiled into the worker: records written with any
/// of them are read (and each has its own fingerprint).
#[test]
fn every_published_version_is_readable_by_this_build() {
    let known = schemas().expect("schemas");
    let mut fingerprints = std::collections::BTreeSet::new();
    for (family, versions) in families() {
        let role = role_of(&family);
        for (name, json) in versions {
            let fingerprint = canonical::fingerprint(&json).expect("fingerprint");
            assert!(
                fingerprints.insert(fingerprint),
                "{name}: fingerprint reused"
            );
            let writer = known
                .writer(&fingerprint)
                .unwrap_or_else(|| panic!("{name} is not in contract::*_SCHEMA_HISTORY"));
            assert_eq!(writer.role, role, "{name}");
        }
    }
}

/// The next version's candidates are FULL-compatible with the current schema: each reads the
/// other's records with no exception, so clients and workers may upgrade in any order.
#[test]
fn candidates_for_the_next_version_are_fully_compatible() {
    let families = families();
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("tests/interop/schemas")).expect("candidates") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("name")
            .to_owned();
        let family = file.split(".v").next().expect("family");
        let (_, current) = families[family].last().expect("current").clone();
        let candidate = read(&path);
        let problems = policy_problems(&current, &candidate).expect("parse");
        assert!(problems.is_empty(), "{file}: {problems:#?}");
        let (current, candidate) = (
            Parsed::parse(&current).expect("current"),
            Parsed::parse(&candidate).expect("candidate"),
        );
        assert_eq!(
            can_read(&candidate, &current),
            vec![],
            "{file} reads the current"
        );
        assert_eq!(
            can_read(&current, &candidate),
            vec![],
            "the current reads {file}"
        );
        // And the worker would accept it at start-up (PIS_WRITER_SCHEMAS_DIR).
        pis_worker::contract::readable_writer(&read(&path), &file).expect("accepted");
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn the_checker_catches_incompatible_changes() {
    let old = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#;
    let removed_field = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#;
    let reordered_enum = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["Y","X"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#;
    let new_field_without_default = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"b","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y","Z"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#;
    let dropped_branch = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"u","type":["null"]}]}"#;
    let changed_type = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"int"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#;
    let added_optional = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"o","type":["null","string"],"default":null},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y","Z"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]},
                                {"type":"record","name":"B2","fields":[]}]}]}"#;
    assert_eq!(
        policy_problems(old, old).expect("parse"),
        Vec::<String>::new()
    );
    assert_eq!(
        policy_problems(old, added_optional).expect("parse"),
        Vec::<String>::new(),
        "optional fields, appended symbols and new branches are allowed"
    );
    for (what, new) in [
        ("removed field", removed_field),
        ("reordered enum", reordered_enum),
        ("field without default", new_field_without_default),
        ("dropped union branch", dropped_branch),
        ("changed type", changed_type),
    ] {
        assert!(
            !policy_problems(old, new).expect("parse").is_empty(),
            "{what} not caught"
        );
    }
}
