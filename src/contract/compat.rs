//! Schema compatibility, as the Avro specification's schema resolution defines it ("Schema
//! Resolution"), plus the project's additive rules (docs/schemas.md).
//!
//! Used at start-up, to accept an extra writer schema only if this build can read its records,
//! and by `tests/schema_compat.rs`, to hold every schema change to the policy.
//!
//! Schemas are compared as JSON, so that a problem can name the field it is about. Logical types
//! are ignored (they do not change the binary encoding); aliases are not used by our schemas and
//! are not honoured.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

/// A schema with every named type resolved to its full name.
#[derive(Debug, Clone)]
enum Node {
    Primitive(String),
    Record {
        name: String,
        fields: Vec<FieldNode>,
    },
    Enum {
        name: String,
        symbols: Vec<String>,
        default: Option<String>,
    },
    Fixed {
        name: String,
        size: u64,
    },
    Array(Box<Node>),
    Map(Box<Node>),
    Union(Vec<Node>),
    /// A reference to a named type defined elsewhere in the same schema.
    Named(String),
}

#[derive(Debug, Clone)]
struct FieldNode {
    name: String,
    node: Node,
    has_default: bool,
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// A parsed schema: its root and its named types.
#[derive(Debug, Clone)]
pub struct Parsed {
    root: Node,
    named: BTreeMap<String, Node>,
}

fn full_name(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_owned(),
    }
}

/// The unqualified part of a full name (resolution matches records by it).
fn short(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

impl Parsed {
    pub fn parse(json: &str) -> Result<Parsed, String> {
        let value: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Parsed, String> {
        let mut named = BTreeMap::new();
        let root = node(value, None, &mut named)?;
        Ok(Parsed { root, named })
    }

    /// The full name of the root type, if it is named (e.g. `be.pisworker.v1.PaymentCommand`).
    pub fn root_name(&self) -> Option<&str> {
        match &self.root {
            Node::Record { name, .. } | Node::Enum { name, .. } | Node::Fixed { name, .. } => {
                Some(name)
            }
            _other => None,
        }
    }

    fn resolve<'a>(&'a self, node: &'a Node) -> &'a Node {
        match node {
            Node::Named(name) => self.named.get(name).unwrap_or(node),
            other => other,
        }
    }
}

fn node(
    value: &Value,
    namespace: Option<&str>,
    named: &mut BTreeMap<String, Node>,
) -> Result<Node, String> {
    match value {
        Value::String(name) if PRIMITIVES.contains(&name.as_str()) => {
            Ok(Node::Primitive(name.clone()))
        }
        Value::String(name) => {
            let full = full_name(name, namespace);
            if named.contains_key(&full) {
                Ok(Node::Named(full))
            } else if named.contains_key(name) {
                Ok(Node::Named(name.clone()))
            } else {
                Err(format!("unknown type {name}"))
            }
        }
        Value::Array(branches) => Ok(Node::Union(
            branches
                .iter()
                .map(|b| node(b, namespace, named))
                .collect::<Result<_, _>>()?,
        )),
        Value::Object(object) => {
            let kind = match object.get("type") {
                Some(Value::String(kind)) => kind.as_str(),
                Some(nested) => return node(nested, namespace, named),
                None => return Err("schema object without \"type\"".into()),
            };
            match kind {
                "record" | "error" | "enum" | "fixed" => {
                    let name = object
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("{kind} without a name"))?;
                    let ns = object
                        .get("namespace")
                        .and_then(Value::as_str)
                        .or(namespace);
                    let full = full_name(name, ns);
                    let inner_ns = full.rsplit_once('.').map(|(ns, _)| ns.to_owned());
                    let defined = match kind {
                        "enum" => Node::Enum {
                            name: full.clone(),
                            symbols: object
                                .get("symbols")
                                .and_then(Value::as_array)
                                .ok_or_else(|| format!("enum {full} without symbols"))?
                                .iter()
                                .filter_map(|s| s.as_str().map(str::to_owned))
                                .collect(),
                            default: object
                                .get("default")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                        },
                        "fixed" => Node::Fixed {
                            name: full.clone(),
                            size: object
                                .get("size")
                                .and_then(Value::as_u64)
                                .ok_or_else(|| format!("fixed {full} without size"))?,
                        },
                        _record => {
                            // Registered first, so that fields may refer to the record itself.
                            named.insert(
                                full.clone(),
                                Node::Record {
                                    name: full.clone(),
                                    fields: vec![],
                                },
                            );
                            let mut fields = Vec::new();
                            for field in object
                                .get("fields")
                                .and_then(Value::as_array)
                                .ok_or_else(|| format!("record {full} without fields"))?
                            {
                                let field_name = field
                                    .get("name")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| format!("a field of {full} has no name"))?;
                                let field_type = field
                                    .get("type")
                                    .ok_or_else(|| format!("{full}.{field_name} has no type"))?;
                                fields.push(FieldNode {
                                    name: field_name.to_owned(),
                                    node: node(field_type, inner_ns.as_deref(), named)?,
                                    has_default: field.get("default").is_some(),
                                });
                            }
                            Node::Record {
                                name: full.clone(),
                                fields,
                            }
                        }
                    };
                    named.insert(full.clone(), defined.clone());
                    Ok(defined)
                }
                "array" => Ok(Node::Array(Box::new(node(
                    object.get("items").ok_or("array without items")?,
                    namespace,
                    named,
                )?))),
                "map" => Ok(Node::Map(Box::new(node(
                    object.get("values").ok_or("map without values")?,
                    namespace,
                    named,
                )?))),
                primitive if PRIMITIVES.contains(&primitive) => {
                    Ok(Node::Primitive(primitive.to_owned()))
                }
                reference => node(&Value::String(reference.to_owned()), namespace, named),
            }
        }
        other => Err(format!("unexpected schema element {other}")),
    }
}

/// Why a reader cannot read some writer data. `Unknown*` problems only hit records that use the
/// new symbol or branch; the rest hit every record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A writer enum symbol the reader does not know (and the reader enum has no default).
    UnknownSymbol { path: String, symbol: String },
    /// A writer union branch no reader branch can read.
    UnknownBranch { path: String, branch: String },
    /// Anything else: a reader field without default that the writer lacks, a type change.
    Incompatible { path: String, why: String },
}

impl Problem {
    /// Whether the problem only concerns data that uses something new (an enum symbol or a
    /// union branch the reader does not know), rather than every record.
    pub fn is_addition(&self) -> bool {
        matches!(
            self,
            Problem::UnknownSymbol { .. } | Problem::UnknownBranch { .. }
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::UnknownSymbol { path, symbol } => {
                write!(f, "{path}: the reader does not know enum symbol {symbol}")
            }
            Problem::UnknownBranch { path, branch } => {
                write!(f, "{path}: the reader has no union branch for {branch}")
            }
            Problem::Incompatible { path, why } => write!(f, "{path}: {why}"),
        }
    }
}

fn describe(node: &Node) -> String {
    match node {
        Node::Primitive(p) => p.clone(),
        Node::Record { name, .. }
        | Node::Enum { name, .. }
        | Node::Fixed { name, .. }
        | Node::Named(name) => name.clone(),
        Node::Array(_) => "array".into(),
        Node::Map(_) => "map".into(),
        Node::Union(_) => "union".into(),
    }
}

/// Everything that keeps `reader` from reading data written with `writer`, per the spec's
/// resolution rules. Empty: every writer datum is readable.
pub fn can_read(reader: &Parsed, writer: &Parsed) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    check(
        reader,
        &reader.root,
        writer,
        &writer.root,
        "",
        &mut seen,
        &mut problems,
    );
    problems
}

fn promotable(writer: &str, reader: &str) -> bool {
    writer == reader
        || matches!(
            (writer, reader),
            ("int", "long" | "float" | "double")
                | ("long", "float" | "double")
                | ("float", "double")
                | ("string", "bytes")
                | ("bytes", "string")
        )
}

/// Whether a reader branch can take a writer schema without any problem (used to pick union
/// branches).
fn matches(reader: &Parsed, r: &Node, writer: &Parsed, w: &Node) -> bool {
    let mut problems = Vec::new();
    check(reader, r, writer, w, "", &mut HashSet::new(), &mut problems);
    problems.is_empty()
}

/// Same kind and (for named types) same unqualified name: the branch a resolver would pick even
/// if some of its content does not resolve.
fn same_shape(reader: &Parsed, r: &Node, writer: &Parsed, w: &Node) -> bool {
    match (reader.resolve(r), writer.resolve(w)) {
        (Node::Primitive(a), Node::Primitive(b)) => promotable(b, a),
        (Node::Record { name: a, .. }, Node::Record { name: b, .. })
        | (Node::Enum { name: a, .. }, Node::Enum { name: b, .. })
        | (Node::Fixed { name: a, .. }, Node::Fixed { name: b, .. }) => short(a) == short(b),
        (Node::Array(_), Node::Array(_)) | (Node::Map(_), Node::Map(_)) => true,
        _other => false,
    }
}

fn check(
    reader: &Parsed,
    r: &Node,
    writer: &Parsed,
    w: &Node,
    path: &str,
    seen: &mut HashSet<(String, String)>,
    out: &mut Vec<Problem>,
) {
    let (r, w) = (reader.resolve(r), writer.resolve(w));
    let here = |p: &str| {
        if p.is_empty() {
            "(root)".to_owned()
        } else {
            p.to_owned()
        }
    };
    match (r, w) {
        // A writer union: every branch the writer may have used must be readable.
        (_, Node::Union(branches)) => {
            for branch in branches {
                let readable = match r {
                    Node::Union(reader_branches) => {
                        let exact = reader_branches
                            .iter()
                            .find(|rb| matches(reader, rb, writer, branch));
                        match exact {
                            Some(_) => true,
                            None => {
                                // Report the content problem of the branch of the same name,
                                // if there is one; otherwise the branch is unknown.
                                if let Some(rb) = reader_branches
                                    .iter()
                                    .find(|rb| same_shape(reader, rb, writer, branch))
                                {
                                    check(reader, rb, writer, branch, path, seen, out);
                                    true
                                } else {
                                    false
                                }
                            }
                        }
                    }
                    other => {
                        if same_shape(reader, other, writer, branch) {
                            check(reader, other, writer, branch, path, seen, out);
                            true
                        } else {
                            false
                        }
                    }
                };
                if !readable {
                    out.push(Problem::UnknownBranch {
                        path: here(path),
                        branch: describe(branch),
                    });
                }
            }
        }
        // A reader union and a plain writer: some branch must read it.
        (Node::Union(reader_branches), other) => {
            if reader_branches
                .iter()
                .any(|rb| matches(reader, rb, writer, other))
            {
                return;
            }
            match reader_branches
                .iter()
                .find(|rb| same_shape(reader, rb, writer, other))
            {
                Some(rb) => check(reader, rb, writer, other, path, seen, out),
                None => out.push(Problem::Incompatible {
                    path: here(path),
                    why: format!("no reader union branch reads {}", describe(other)),
                }),
            }
        }
        (Node::Primitive(a), Node::Primitive(b)) => {
            if !promotable(b, a) {
                out.push(Problem::Incompatible {
                    path: here(path),
                    why: format!("{b} cannot be read as {a}"),
                });
            }
        }
        (
            Node::Record {
                name: rn,
                fields: rf,
            },
            Node::Record {
                name: wn,
                fields: wf,
            },
        ) => {
            if short(rn) != short(wn) {
                out.push(Problem::Incompatible {
                    path: here(path),
                    why: format!("record {wn} cannot be read as {rn}"),
                });
                return;
            }
            // Recursive types: each pair once.
            if !seen.insert((rn.clone(), wn.clone())) {
                return;
            }
            for field in rf {
                let field_path = if path.is_empty() {
                    field.name.clone()
                } else {
                    format!("{path}.{}", field.name)
                };
                match wf.iter().find(|f| f.name == field.name) {
                    Some(written) => {
                        check(
                            reader,
                            &field.node,
                            writer,
                            &written.node,
                            &field_path,
                            seen,
                            out,
                        );
                    }
                    None if field.has_default => {}
                    None => out.push(Problem::Incompatible {
                        path: field_path,
                        why: "the writer lacks this field and the reader has no default".into(),
                    }),
                }
            }
        }
        (
            Node::Enum {
                name: rn,
                symbols: rs,
                default,
            },
            Node::Enum {
                name: wn,
                symbols: ws,
                ..
            },
        ) => {
            if short(rn) != short(wn) {
                out.push(Problem::Incompatible {
                    path: here(path),
                    why: format!("enum {wn} cannot be read as {rn}"),
                });
                return;
            }
            if default.is_none() {
                for symbol in ws.iter().filter(|s| !rs.contains(s)) {
                    out.push(Problem::UnknownSymbol {
                        path: here(path),
                        symbol: symbol.clone(),
                    });
                }
            }
        }
        (Node::Fixed { name: rn, size: rs }, Node::Fixed { name: wn, size: ws }) => {
            if short(rn) != short(wn) || rs != ws {
                out.push(Problem::Incompatible {
                    path: here(path),
                    why: format!("fixed {wn}[{ws}] cannot be read as {rn}[{rs}]"),
                });
            }
        }
        (Node::Array(ri), Node::Array(wi)) => {
            check(reader, ri, writer, wi, &format!("{path}[]"), seen, out)
        }
        (Node::Map(rv), Node::Map(wv)) => {
            check(reader, rv, writer, wv, &format!("{path}{{}}"), seen, out)
        }
        (r, w) => out.push(Problem::Incompatible {
            path: here(path),
            why: format!("{} cannot be read as {}", describe(w), describe(r)),
        }),
    }
}

/// The project's additive rules between two versions of a schema (`old` published before
/// `new`): named types are kept, fields are kept (same name), new fields have a default, enum
/// symbols are only appended, union branches are only added. Together they make every record
/// that uses no new symbol or branch readable in both directions.
pub fn additive_problems(old: &Value, new: &Value) -> Vec<String> {
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
                    out.insert(full_name(name, ns), schema.clone());
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

/// The policy between a published version `old` and its successor `new` (docs/schemas.md):
/// BACKWARD (the new reader reads everything the old writer wrote), the additive rules, and
/// FORWARD for every record that uses no new enum symbol or union branch (an old reader reads
/// what the new writer writes, except the additions themselves). Returns every violation.
pub fn policy_problems(old_json: &str, new_json: &str) -> Result<Vec<String>, String> {
    let old_value: Value = serde_json::from_str(old_json).map_err(|e| e.to_string())?;
    let new_value: Value = serde_json::from_str(new_json).map_err(|e| e.to_string())?;
    let old = Parsed::from_value(&old_value)?;
    let new = Parsed::from_value(&new_value)?;
    let mut problems: Vec<String> = can_read(&new, &old)
        .into_iter()
        .map(|p| format!("backward (new reads old): {p}"))
        .collect();
    problems.extend(
        can_read(&old, &new)
            .into_iter()
            .filter(|p| !p.is_addition())
            .map(|p| format!("forward (old reads new): {p}")),
    );
    problems.extend(additive_problems(&old_value, &new_value));
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(json: &str) -> Parsed {
        Parsed::parse(json).expect("schema")
    }

    const BASE: &str = r#"{"type":"record","name":"R","namespace":"n","fields":[
        {"name":"a","type":"string"},
        {"name":"n","type":"int"},
        {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
        {"name":"u","type":["null",{"type":"record","name":"B1","fields":[{"name":"x","type":"string"}]}],"default":null}]}"#;

    fn problems(reader: &str, writer: &str) -> Vec<Problem> {
        can_read(&parsed(reader), &parsed(writer))
    }

    #[test]
    fn a_schema_reads_itself() {
        assert_eq!(problems(BASE, BASE), vec![]);
    }

    #[test]
    fn a_new_optional_field_is_compatible_both_ways() {
        let new = BASE.replace(
            r#"{"name":"a","type":"string"},"#,
            r#"{"name":"a","type":"string"},{"name":"extra","type":["null","string"],"default":null},"#,
        );
        assert_eq!(problems(&new, BASE), vec![]);
        assert_eq!(problems(BASE, &new), vec![]);
    }

    #[test]
    fn a_new_field_without_default_breaks_backward() {
        let new = BASE.replace(
            r#"{"name":"a","type":"string"},"#,
            r#"{"name":"a","type":"string"},{"name":"extra","type":"string"},"#,
        );
        let found = problems(&new, BASE);
        assert!(
            matches!(found.as_slice(), [Problem::Incompatible { path, .. }] if path == "extra"),
            "{found:?}"
        );
        assert_eq!(problems(BASE, &new), vec![], "old readers skip it");
    }

    #[test]
    fn promotions_follow_the_spec() {
        let long = BASE.replace(r#""type":"int""#, r#""type":"long""#);
        assert_eq!(problems(&long, BASE), vec![], "int is read as long");
        assert!(!problems(BASE, &long).is_empty(), "long is not read as int");
    }

    #[test]
    fn appended_symbols_and_branches_are_additions() {
        let new = BASE.replace(r#"["X","Y"]"#, r#"["X","Y","Z"]"#).replace(
            r#"{"name":"x","type":"string"}]}]"#,
            r#"{"name":"x","type":"string"}]},{"type":"record","name":"B2","fields":[]}]"#,
        );
        assert_eq!(problems(&new, BASE), vec![]);
        let old_reads_new = problems(BASE, &new);
        assert_eq!(old_reads_new.len(), 2, "{old_reads_new:?}");
        assert!(old_reads_new.iter().all(Problem::is_addition));
        assert!(policy_problems(BASE, &new).expect("policy").is_empty());
        // An enum default makes a new symbol readable.
        let with_default = BASE.replace(r#"["X","Y"]}"#, r#"["X","Y"],"default":"X"}"#);
        let new_with_default = with_default.replace(r#"["X","Y"]"#, r#"["X","Y","Z"]"#);
        assert_eq!(problems(&with_default, &new_with_default), vec![]);
    }

    #[test]
    fn a_changed_branch_content_is_reported_inside_it() {
        let new = BASE.replace(
            r#"{"name":"x","type":"string"}"#,
            r#"{"name":"x","type":"int"}"#,
        );
        let found = problems(BASE, &new);
        assert!(
            matches!(found.as_slice(), [Problem::Incompatible { path, .. }] if path == "u.x"),
            "{found:?}"
        );
    }

    #[test]
    fn the_policy_refuses_removals_renames_and_reorders() {
        let removed = BASE.replace(r#"{"name":"n","type":"int"},"#, "");
        let reordered = BASE.replace(r#"["X","Y"]"#, r#"["Y","X"]"#);
        let renamed = BASE.replace(r#""name":"a""#, r#""name":"b""#);
        let dropped_branch = BASE.replace(
            r#"["null",{"type":"record","name":"B1","fields":[{"name":"x","type":"string"}]}]"#,
            r#"["null"]"#,
        );
        for (what, new) in [
            ("removed field", removed),
            ("reordered enum", reordered),
            ("renamed field", renamed),
            ("dropped branch", dropped_branch),
        ] {
            assert!(
                !policy_problems(BASE, &new).expect("policy").is_empty(),
                "{what} not caught"
            );
        }
    }
}
