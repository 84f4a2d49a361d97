//! Every schema in schemas/ must stay compatible with each of its earlier versions in
//! schemas/history/ (the policy in docs/contract.md): named types keep their fields, new fields
//! have defaults, enums only gain symbols at the end, unions only gain branches.

use std::collections::BTreeMap;

use serde_json::Value;

/// Named types of a schema, by full name.
fn named_types(schema: &Value, namespace: Option<&str>, out: &mut BTreeMap<String, Value>) {
    match schema {
        Value::Array(branches) => {
            for b in branches {
                named_types(b, namespace, out);
            }
        }
        Value::Object(o) => {
            let kind = o.get("type").and_then(Value::as_str).unwrap_or_default();
            let ns = o.get("namespace").and_then(Value::as_str).or(namespace);
            if let Some(name) = o.get("name").and_then(Value::as_str) {
                if matches!(kind, "record" | "enum" | "fixed") {
                    let full = match ns {
                        Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
                        _ => name.to_owned(),
                    };
                    out.insert(full, schema.clone());
                }
            }
            if let Some(fields) = o.get("fields").and_then(Value::as_array) {
                for f in fields {
                    if let Some(t) = f.get("type") {
                        named_types(t, ns, out);
                    }
                }
            }
            for key in ["items", "values"] {
                if let Some(t) = o.get(key) {
                    named_types(t, ns, out);
                }
            }
            if let Some(t @ (Value::Object(_) | Value::Array(_))) = o.get("type") {
                named_types(t, ns, out);
            }
        }
        _ => {}
    }
}

fn branch_names(t: &Value) -> Vec<String> {
    match t {
        Value::Array(branches) => branches.iter().flat_map(branch_names).collect(),
        Value::String(s) => vec![s.clone()],
        Value::Object(o) => o
            .get("name")
            .or_else(|| o.get("type"))
            .and_then(Value::as_str)
            .map(|s| vec![s.to_owned()])
            .unwrap_or_default(),
        _ => vec![],
    }
}

fn check(old: &Value, new: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let (mut old_types, mut new_types) = (BTreeMap::new(), BTreeMap::new());
    named_types(old, None, &mut old_types);
    named_types(new, None, &mut new_types);
    for (name, old_type) in &old_types {
        let Some(new_type) = new_types.get(name) else {
            problems.push(format!("{name} was removed"));
            continue;
        };
        if let Some(old_symbols) = old_type.get("symbols").and_then(Value::as_array) {
            let new_symbols = new_type.get("symbols").and_then(Value::as_array);
            if new_symbols.is_none_or(|n| !n.starts_with(old_symbols)) {
                problems.push(format!("{name}: enum symbols must only be appended"));
            }
        }
        if let Some(old_fields) = old_type.get("fields").and_then(Value::as_array) {
            let new_fields = new_type
                .get("fields")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for f in old_fields {
                let field = f["name"].as_str().unwrap_or_default();
                match new_fields.iter().find(|n| n["name"] == f["name"]) {
                    None => problems.push(format!("{name}.{field} was removed")),
                    Some(n) => {
                        let (ob, nb) = (branch_names(&f["type"]), branch_names(&n["type"]));
                        for b in ob.iter().filter(|b| !nb.contains(b)) {
                            problems.push(format!("{name}.{field}: type/branch {b} was removed"));
                        }
                    }
                }
            }
            for n in &new_fields {
                let known = old_fields.iter().any(|f| f["name"] == n["name"]);
                if !known && n.get("default").is_none() {
                    problems.push(format!(
                        "{name}.{}: a new field needs a default",
                        n["name"].as_str().unwrap_or_default()
                    ));
                }
            }
        }
    }
    problems
}

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_schema_is_compatible_with_its_history() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("{root}/schemas/history")).expect("history dir") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default()
            .to_owned();
        let current = file.split(".v").next().unwrap_or_default();
        let problems = check(
            &load(path.to_str().expect("path")),
            &load(&format!("{root}/schemas/{current}.avsc")),
        );
        assert!(
            problems.is_empty(),
            "{file} -> {current}.avsc: {problems:#?}"
        );
        checked += 1;
    }
    assert!(checked >= 2, "history holds both schemas");
}

#[test]
fn the_checker_catches_incompatible_changes() {
    let old: Value = serde_json::from_str(
        r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#,
    )
    .expect("json");
    let removed_field = serde_json::from_str(
        r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#,
    )
    .expect("json");
    let reordered_enum = serde_json::from_str(
        r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["Y","X"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#,
    )
    .expect("json");
    let new_field_without_default = serde_json::from_str(
        r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"b","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y","Z"]}},
            {"name":"u","type":["null",{"type":"record","name":"B1","fields":[]}]}]}"#,
    )
    .expect("json");
    let dropped_branch = serde_json::from_str(
        r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"u","type":["null"]}]}"#,
    )
    .expect("json");
    assert!(check(&old, &old).is_empty());
    for (what, new) in [
        ("removed field", removed_field),
        ("reordered enum", reordered_enum),
        ("field without default", new_field_without_default),
        ("dropped union branch", dropped_branch),
    ] {
        assert!(!check(&old, &new).is_empty(), "{what} not caught");
    }
}
