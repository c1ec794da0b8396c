//! Result sets the console sends: a RowDescription with PgBouncer's column types, DataRows in
//! text format, and the command tag.

use crate::protocol;
use bytes::{BufMut, BytesMut};

/// Column types as PgBouncer declares them, so exporters that check types parse us alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Text,
    Int4,
    Int8,
    /// PgBouncer's unsigned 64-bit counters.
    Numeric,
}

impl Ty {
    fn oid_and_size(self) -> (u32, i16) {
        match self {
            Ty::Text => (25, -1),
            Ty::Int4 => (23, 4),
            Ty::Int8 => (20, 8),
            Ty::Numeric => (1700, -1),
        }
    }
}

/// One value; `Null` is sent as SQL NULL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Val {
    Null,
    Str(String),
    Int(i64),
    UInt(u64),
}

impl From<&str> for Val {
    fn from(s: &str) -> Self {
        Val::Str(s.to_string())
    }
}

impl From<String> for Val {
    fn from(s: String) -> Self {
        Val::Str(s)
    }
}

impl From<Option<String>> for Val {
    fn from(s: Option<String>) -> Self {
        s.map_or(Val::Null, Val::Str)
    }
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

impl From<usize> for Val {
    fn from(v: usize) -> Self {
        Val::UInt(v as u64)
    }
}

impl From<u64> for Val {
    fn from(v: u64) -> Self {
        Val::UInt(v)
    }
}

impl From<u32> for Val {
    fn from(v: u32) -> Self {
        Val::UInt(v as u64)
    }
}

impl From<bool> for Val {
    /// PgBouncer's flags are int4 0/1.
    fn from(v: bool) -> Self {
        Val::Int(v as i64)
    }
}

/// A result set being built: columns first, then rows, then `finish`.
pub struct ResultSet {
    cols: Vec<(&'static str, Ty)>,
    rows: Vec<Vec<Val>>,
}

impl ResultSet {
    pub fn new(cols: &[(&'static str, Ty)]) -> Self {
        ResultSet {
            cols: cols.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, vals: Vec<Val>) {
        debug_assert_eq!(vals.len(), self.cols.len(), "row width");
        self.rows.push(vals);
    }

    /// RowDescription, DataRows and CommandComplete `SHOW`.
    pub fn write(&self, buf: &mut BytesMut) {
        protocol::message(buf, b'T', |buf| {
            buf.put_i16(self.cols.len() as i16);
            for (name, ty) in &self.cols {
                let (oid, size) = ty.oid_and_size();
                protocol::put_cstr(buf, name);
                buf.put_u32(0);
                buf.put_i16(0);
                buf.put_u32(oid);
                buf.put_i16(size);
                buf.put_i32(-1);
                buf.put_i16(0);
            }
        });
        for r in &self.rows {
            protocol::message(buf, b'D', |buf| {
                buf.put_i16(r.len() as i16);
                for v in r {
                    let text = match v {
                        Val::Null => {
                            buf.put_i32(-1);
                            continue;
                        }
                        Val::Str(s) => s.clone(),
                        Val::Int(i) => i.to_string(),
                        Val::UInt(u) => u.to_string(),
                    };
                    buf.put_i32(text.len() as i32);
                    buf.extend_from_slice(text.as_bytes());
                }
            });
        }
        protocol::command_complete(buf, "SHOW");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_description_and_rows_are_framed() {
        let mut rs = ResultSet::new(&[("name", Ty::Text), ("n", Ty::Numeric)]);
        rs.row(vec!["a".into(), Val::UInt(7)]);
        rs.row(vec![Val::Null, Val::Int(-1)]);
        let mut b = BytesMut::new();
        rs.write(&mut b);
        // T, two D, C; each length covers its body.
        let mut tags = Vec::new();
        let mut at = 0;
        while at < b.len() {
            tags.push(b[at]);
            let len = i32::from_be_bytes(b[at + 1..at + 5].try_into().unwrap()) as usize;
            at += 1 + len;
        }
        assert_eq!(at, b.len());
        assert_eq!(tags, b"TDDC");
        // The numeric column is declared as numeric (oid 1700).
        let t_body = &b[5..];
        let first_col_end = t_body[2..].iter().position(|&c| c == 0).unwrap() + 3;
        let oid = u32::from_be_bytes(
            t_body[first_col_end + 6..first_col_end + 10]
                .try_into()
                .unwrap(),
        );
        assert_eq!(oid, 25);
    }
}
