//! A strict structural check of an Avro binary datum against its writer schema, run before
//! apache-avro decodes it.
//!
//! apache-avro 0.21 is lenient at the end of its input: a union index, string or boolean cut off
//! by the end of the bytes reads as null instead of failing (it does so to read data written
//! with fewer fields). A truncated command would then decode as a different, valid-looking
//! command. This walk reads every value the writer schema says is there, and fails on a value
//! cut short, an out-of-range union or enum index, a non-UTF-8 string, or trailing bytes.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::Name;

/// Nesting deeper than this is refused (recursive schemas and hostile input).
const MAX_DEPTH: usize = 64;

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("{what}: the datum ends at byte {}", self.bytes.len()))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// A zig-zag varint (int or long), at most 10 bytes.
    fn varint(&mut self, what: &str) -> Result<i64, String> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = self.take(1, what)?[0];
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(format!(
            "{what}: a variable-length integer longer than 10 bytes"
        ))
    }

    fn length(&mut self, what: &str) -> Result<usize, String> {
        let n = self.varint(what)?;
        usize::try_from(n).map_err(|_| format!("{what}: negative length {n}"))
    }
}

fn collect<'s>(schema: &'s Schema, names: &mut HashMap<Name, &'s Schema>) {
    match schema {
        Schema::Record(record) if names.insert(record.name.clone(), schema).is_none() => {
            for field in &record.fields {
                collect(&field.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.clone(), schema);
        }
        Schema::Fixed(f) => {
            names.insert(f.name.clone(), schema);
        }
        Schema::Array(a) => collect(&a.items, names),
        Schema::Map(m) => collect(&m.types, names),
        Schema::Union(u) => {
            for variant in u.variants() {
                collect(variant, names);
            }
        }
        Schema::Decimal(d) => collect(&d.inner, names),
        _other => {}
    }
}

/// Checks that `datum` is exactly one value of `schema`.
pub fn check_datum(schema: &Schema, datum: &[u8]) -> Result<(), String> {
    let mut names = HashMap::new();
    collect(schema, &mut names);
    let mut cursor = Cursor {
        bytes: datum,
        pos: 0,
    };
    walk(schema, &names, &mut cursor, "", 0)?;
    let rest = datum.len() - cursor.pos;
    if rest > 0 {
        return Err(format!("{rest} trailing bytes after the value"));
    }
    Ok(())
}

fn walk(
    schema: &Schema,
    names: &HashMap<Name, &Schema>,
    cursor: &mut Cursor<'_>,
    path: &str,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{path}: nested deeper than {MAX_DEPTH}"));
    }
    let what = if path.is_empty() { "value" } else { path };
    match schema {
        Schema::Null => Ok(()),
        Schema::Boolean => match cursor.take(1, what)?[0] {
            0 | 1 => Ok(()),
            other => Err(format!("{what}: {other} is not a boolean")),
        },
        Schema::Int
        | Schema::Date
        | Schema::TimeMillis
        | Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => cursor.varint(what).map(|_| ()),
        Schema::Float => cursor.take(4, what).map(|_| ()),
        Schema::Double => cursor.take(8, what).map(|_| ()),
        Schema::Bytes | Schema::BigDecimal | Schema::Uuid => {
            let n = cursor.length(what)?;
            cursor.take(n, what).map(|_| ())
        }
        Schema::String => {
            let n = cursor.length(what)?;
            let bytes = cursor.take(n, what)?;
            std::str::from_utf8(bytes)
                .map(|_| ())
                .map_err(|_| format!("{what}: not UTF-8"))
        }
        Schema::Fixed(f) => cursor.take(f.size, what).map(|_| ()),
        Schema::Duration => cursor.take(12, what).map(|_| ()),
        Schema::Decimal(d) => walk(&d.inner, names, cursor, path, depth + 1),
        Schema::Enum(e) => {
            let index = cursor.varint(what)?;
            if index < 0 || index as usize >= e.symbols.len() {
                return Err(format!("{what}: enum index {index} out of range"));
            }
            Ok(())
        }
        Schema::Union(u) => {
            let index = cursor.varint(what)?;
            let variant = usize::try_from(index)
                .ok()
                .and_then(|i| u.variants().get(i))
                .ok_or_else(|| format!("{what}: union index {index} out of range"))?;
            walk(variant, names, cursor, path, depth + 1)
        }
        Schema::Array(a) => blocks(cursor, what, |cursor, i| {
            walk(&a.items, names, cursor, &format!("{what}[{i}]"), depth + 1)
        }),
        Schema::Map(m) => blocks(cursor, what, |cursor, i| {
            let n = cursor.length(what)?;
            let key = cursor.take(n, what)?;
            std::str::from_utf8(key).map_err(|_| format!("{what}: a key is not UTF-8"))?;
            walk(
                &m.types,
                names,
                cursor,
                &format!("{what}{{{i}}}"),
                depth + 1,
            )
        }),
        Schema::Record(record) => {
            for field in &record.fields {
                let field_path = if path.is_empty() {
                    field.name.clone()
                } else {
                    format!("{path}.{}", field.name)
                };
                walk(&field.schema, names, cursor, &field_path, depth + 1)?;
            }
            Ok(())
        }
        Schema::Ref { name } => {
            let target = names
                .get(name)
                .or_else(|| {
                    names
                        .iter()
                        .find(|(n, _)| n.name == name.name)
                        .map(|(_, s)| s)
                })
                .ok_or_else(|| format!("{what}: unknown type {}", name.name))?;
            walk(target, names, cursor, path, depth + 1)
        }
    }
}

/// Array and map blocks: a count, (if negative) a byte size, the items; a zero count ends.
fn blocks(
    cursor: &mut Cursor<'_>,
    what: &str,
    mut item: impl FnMut(&mut Cursor<'_>, usize) -> Result<(), String>,
) -> Result<(), String> {
    let mut index = 0usize;
    loop {
        let count = cursor.varint(what)?;
        if count == 0 {
            return Ok(());
        }
        if count < 0 {
            // The block's size in bytes follows a negative count.
            cursor.length(what)?;
        }
        let count = count.unsigned_abs();
        // Every item takes at least... nothing (null items): bound the count by the input.
        if count > cursor.bytes.len() as u64 + 1_000 {
            return Err(format!("{what}: block of {count} items in a short datum"));
        }
        for _ in 0..count {
            item(cursor, index)?;
            index += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;

    fn schema() -> Schema {
        Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"a","type":"string"},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
                {"name":"list","type":{"type":"array","items":"E"}},
                {"name":"b","type":["null","string"],"default":null},
                {"name":"c","type":["null","boolean"],"default":null}]}"#,
        )
        .expect("schema")
    }

    fn datum() -> Vec<u8> {
        apache_avro::to_avro_datum(
            &schema(),
            Value::Record(vec![
                ("a".into(), Value::String("xyz".into())),
                ("e".into(), Value::Enum(1, "Y".into())),
                (
                    "list".into(),
                    Value::Array(vec![Value::Enum(0, "X".into()), Value::Enum(1, "Y".into())]),
                ),
                (
                    "b".into(),
                    Value::Union(1, Box::new(Value::String("q".into()))),
                ),
                ("c".into(), Value::Union(0, Box::new(Value::Null))),
            ]),
        )
        .expect("datum")
    }

    #[test]
    fn a_whole_datum_passes_and_every_truncation_fails() {
        let bytes = datum();
        assert_eq!(check_datum(&schema(), &bytes), Ok(()));
        for n in 0..bytes.len() {
            assert!(check_datum(&schema(), &bytes[..n]).is_err(), "cut at {n}");
            // What apache-avro alone would accept:
            let mut short = &bytes[..n];
            let _ = apache_avro::from_avro_datum(&schema(), &mut short, None);
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(check_datum(&schema(), &long).is_err(), "trailing byte");
    }

    #[test]
    fn out_of_range_indexes_and_bad_text_fail() {
        let bytes = datum();
        // a = "xyz": [6, x, y, z]; e at byte 4.
        let mut bad_enum = bytes.clone();
        bad_enum[4] = 2 * 5;
        assert!(check_datum(&schema(), &bad_enum).is_err());
        let mut bad_utf8 = bytes.clone();
        bad_utf8[1] = 0xFF;
        assert!(check_datum(&schema(), &bad_utf8).is_err());
        let mut bad_union = bytes.clone();
        let last = bad_union.len() - 1;
        bad_union[last] = 2 * 7;
        assert!(check_datum(&schema(), &bad_union).is_err());
    }

    #[test]
    fn arrays_in_several_blocks_and_sized_blocks_pass() {
        // list as two blocks: [count -1, size 1, X] [count 1, Y] [0].
        let mut bytes = vec![6, b'x', b'y', b'z', 2];
        bytes.extend([1, 2, 0, 2, 2, 0]);
        bytes.extend([0]);
        bytes.extend([0]);
        assert_eq!(check_datum(&schema(), &bytes), Ok(()));
    }
}
