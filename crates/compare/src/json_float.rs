//! Floats in report JSON: a number when finite, else the string `"inf"`,
//! `"-inf"` or `"nan"` (JSON has no infinities, and null would read as
//! "not measured"). Used with `#[serde(with = "...")]`.

use serde::{Deserialize, Deserializer, Serializer};

/// For `f64` fields.
pub mod float {
    use super::*;

    /// Writes a number, or a string for a non-finite value.
    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() { s.serialize_f64(*x) } else { s.serialize_str(non_finite_name(*x)) }
    }

    /// Reads a number or one of `"inf"`, `"-inf"`, `"nan"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_value(NumberOrName::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// For `Option<f64>` fields.
pub mod opt_float {
    use super::*;

    /// Writes null, a number, or a string for a non-finite value.
    pub fn serialize<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match x {
            None => s.serialize_none(),
            Some(v) => float::serialize(v, s),
        }
    }

    /// Reads null, a number or one of `"inf"`, `"-inf"`, `"nan"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Option::<NumberOrName>::deserialize(d)?.map(from_value).transpose().map_err(serde::de::Error::custom)
    }
}

fn non_finite_name(x: f64) -> &'static str {
    if x.is_nan() {
        "nan"
    } else if x > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrName {
    Number(f64),
    Name(String),
}

fn from_value(v: NumberOrName) -> Result<f64, String> {
    match v {
        NumberOrName::Number(x) => Ok(x),
        NumberOrName::Name(n) => match n.as_str() {
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            "nan" => Ok(f64::NAN),
            other => Err(format!("`{other}` is not a number (expected a number, \"inf\", \"-inf\" or \"nan\")")),
        },
    }
}
