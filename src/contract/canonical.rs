//! Avro Parsing Canonical Form and its CRC-64-AVRO fingerprint, per the specification
//! ("Parsing Canonical Form for Schemas" and "Schema Fingerprints").
//!
//! Our own because apache-avro 0.21 keeps `{"type":"string"}` where a logical type was stripped,
//! instead of the primitive `"string"` the spec's [PRIMITIVES] rule requires. Its fingerprints
//! then differ from every other implementation's (Java, fastavro) for any schema with a logical
//! type, and a client's single-object records would look like an unknown schema.

use serde_json::{Map, Value};

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schema is not canonicalisable: {0}")]
pub struct CanonicalError(String);

/// The Parsing Canonical Form of a schema given as JSON text.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, CanonicalError> {
    let value: Value =
        serde_json::from_str(schema_json).map_err(|e| CanonicalError(e.to_string()))?;
    let mut out = String::new();
    let mut defined = Vec::new();
    write(&value, None, &mut defined, &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO (Rabin) of the canonical form, as the 8 little-endian bytes of single-object
/// encoding.
pub fn fingerprint(schema_json: &str) -> Result<[u8; 8], CanonicalError> {
    Ok(crc64_avro(parsing_canonical_form(schema_json)?.as_bytes()).to_le_bytes())
}

const EMPTY: u64 = 0xc15d_213a_a4d7_a795;

pub fn crc64_avro(data: &[u8]) -> u64 {
    let table = table();
    data.iter().fold(EMPTY, |fp, b| {
        (fp >> 8) ^ table[((fp ^ u64::from(*b)) & 0xff) as usize]
    })
}

fn table() -> [u64; 256] {
    let mut table = [0u64; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut fp = i as u64;
        for _ in 0..8 {
            fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
        }
        *slot = fp;
    }
    table
}

fn full_name(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_owned(),
    }
}

fn json_string(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

fn write(
    value: &Value,
    namespace: Option<&str>,
    defined: &mut Vec<String>,
    out: &mut String,
) -> Result<(), CanonicalError> {
    match value {
        Value::String(name) => {
            if PRIMITIVES.contains(&name.as_str()) {
                out.push_str(&json_string(name));
            } else {
                out.push_str(&json_string(&full_name(name, namespace)));
            }
            Ok(())
        }
        Value::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(branch, namespace, defined, out)?;
            }
            out.push(']');
            Ok(())
        }
        Value::Object(object) => write_object(object, namespace, defined, out),
        other => Err(CanonicalError(format!("unexpected schema element {other}"))),
    }
}

fn write_object(
    object: &Map<String, Value>,
    namespace: Option<&str>,
    defined: &mut Vec<String>,
    out: &mut String,
) -> Result<(), CanonicalError> {
    let kind = object
        .get("type")
        .ok_or_else(|| CanonicalError("schema object without \"type\"".into()))?;
    let kind_name = match kind {
        Value::String(k) => k.as_str(),
        // {"type": {...}} or {"type": [...]}: the nested schema is the schema.
        nested => return write(nested, namespace, defined, out),
    };
    match kind_name {
        "record" | "error" | "enum" | "fixed" => {
            let name = object
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| CanonicalError(format!("{kind_name} without a name")))?;
            let own_namespace = object
                .get("namespace")
                .and_then(Value::as_str)
                .or(namespace);
            let full = full_name(name, own_namespace);
            // Names are scoped by the full name's namespace.
            let inner_namespace = full.rsplit_once('.').map(|(ns, _)| ns.to_owned());
            if defined.contains(&full) {
                out.push_str(&json_string(&full));
                return Ok(());
            }
            defined.push(full.clone());
            out.push_str(&format!("{{\"name\":{},\"type\":", json_string(&full)));
            out.push_str(&json_string(if kind_name == "error" {
                "record"
            } else {
                kind_name
            }));
            match kind_name {
                "record" | "error" => {
                    out.push_str(",\"fields\":[");
                    let fields = object
                        .get("fields")
                        .and_then(Value::as_array)
                        .ok_or_else(|| CanonicalError(format!("record {full} without fields")))?;
                    for (i, field) in fields.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let field_name =
                            field.get("name").and_then(Value::as_str).ok_or_else(|| {
                                CanonicalError(format!("a field of {full} has no name"))
                            })?;
                        let field_type = field.get("type").ok_or_else(|| {
                            CanonicalError(format!("field {field_name} has no type"))
                        })?;
                        out.push_str(&format!("{{\"name\":{},\"type\":", json_string(field_name)));
                        write(field_type, inner_namespace.as_deref(), defined, out)?;
                        out.push('}');
                    }
                    out.push(']');
                }
                "enum" => {
                    let symbols = object
                        .get("symbols")
                        .ok_or_else(|| CanonicalError(format!("enum {full} without symbols")))?;
                    out.push_str(&format!(",\"symbols\":{symbols}"));
                }
                _fixed => {
                    let size = object
                        .get("size")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| CanonicalError(format!("fixed {full} without size")))?;
                    out.push_str(&format!(",\"size\":{size}"));
                }
            }
            out.push('}');
            Ok(())
        }
        "array" => {
            let items = object
                .get("items")
                .ok_or_else(|| CanonicalError("array without items".into()))?;
            out.push_str("{\"type\":\"array\",\"items\":");
            write(items, namespace, defined, out)?;
            out.push('}');
            Ok(())
        }
        "map" => {
            let values = object
                .get("values")
                .ok_or_else(|| CanonicalError("map without values".into()))?;
            out.push_str("{\"type\":\"map\",\"values\":");
            write(values, namespace, defined, out)?;
            out.push('}');
            Ok(())
        }
        // A primitive, possibly annotated (logicalType, doc...): [STRIP] then [PRIMITIVES].
        primitive if PRIMITIVES.contains(&primitive) => {
            out.push_str(&json_string(primitive));
            Ok(())
        }
        // A reference to a named type written as {"type": "Name"}.
        reference => {
            out.push_str(&json_string(&full_name(reference, namespace)));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from the Avro specification's test data (CRC-64-AVRO, as signed longs).
    #[test]
    fn fingerprints_match_the_reference_values() {
        assert_eq!(crc64_avro(b"\"int\"") as i64, 8247732601305521295);
        assert_eq!(crc64_avro(b"\"null\"") as i64, 7195948357588979594);
    }

    #[test]
    fn logical_types_and_annotations_are_stripped_to_primitives() {
        let form = parsing_canonical_form(
            r#"{"type":"record","name":"R","namespace":"a.b","doc":"x","fields":[
                {"name":"id","type":{"type":"string","logicalType":"uuid"},"doc":"d"},
                {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"},"default":0},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["A","B"],"default":"A"}},
                {"name":"again","type":["null","E"]},
                {"name":"list","type":{"type":"array","items":"int"}}
            ]}"#,
        )
        .expect("canonical");
        assert_eq!(
            form,
            r#"{"name":"a.b.R","type":"record","fields":[{"name":"id","type":"string"},{"name":"at","type":"long"},{"name":"e","type":{"name":"a.b.E","type":"enum","symbols":["A","B"]}},{"name":"again","type":["null","a.b.E"]},{"name":"list","type":{"type":"array","items":"int"}}]}"#
        );
    }
}
