//! [`FunctionId`], [`Recipe`] and the canonical recipe encoding that defines recipe addresses.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::addr::{ADDR_LEN, CAddr};
use crate::error::{DerivaError, Result};

/// Version byte that opens every canonical recipe encoding.
pub const RECIPE_ENCODING_VERSION: u8 = 1;

/// The BLAKE3 `derive_key` context for recipe addresses (encoding version 1).
///
/// Hashing recipes in this derived-key domain, while leaves use plain BLAKE3, means a recipe
/// address can never equal a leaf address.
pub const RECIPE_ADDR_CONTEXT: &str = "deriva 2026-11-25 recipe address v1";

/// Longest function name or version, in bytes.
pub const MAX_FUNCTION_PART_LEN: usize = 128;
/// Most inputs a recipe may have.
pub const MAX_INPUTS: usize = 1024;
/// Most params a recipe may have.
pub const MAX_PARAMS: usize = 256;
/// Longest param key, in bytes.
pub const MAX_PARAM_KEY_LEN: usize = 128;
/// Longest param value, in bytes.
pub const MAX_PARAM_VALUE_LEN: usize = 64 * 1024;

/// Recipe parameters: string keys to string values, always iterated in key order.
pub type Params = BTreeMap<String, String>;

/// A function name and version, such as `concat/v1`.
///
/// Both parts are non-empty, at most [`MAX_FUNCTION_PART_LEN`] bytes, and contain neither `/`
/// nor control characters, so `name/version` is unambiguous.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionId {
    name: String,
    version: String,
}

impl FunctionId {
    /// Validates and builds a function id.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Result<Self> {
        let (name, version) = (name.into(), version.into());
        check_function_part("function name", &name)?;
        check_function_part("function version", &version)?;
        Ok(Self { name, version })
    }

    /// The name, such as `concat`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version, such as `v1`.
    pub fn version(&self) -> &str {
        &self.version
    }
}

fn check_function_part(what: &str, s: &str) -> Result<()> {
    let bad = |why: String| Err(DerivaError::InvalidInput(format!("{what} {why}")));
    if s.is_empty() {
        return bad("is empty".into());
    }
    if s.len() > MAX_FUNCTION_PART_LEN {
        return bad(format!(
            "is {} bytes long; the limit is {MAX_FUNCTION_PART_LEN}",
            s.len()
        ));
    }
    if s.contains('/') {
        return bad(format!("{s:?} contains '/'"));
    }
    if s.chars().any(char::is_control) {
        return bad(format!("{s:?} contains a control character"));
    }
    Ok(())
}

impl fmt::Display for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.version)
    }
}

impl fmt::Debug for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FunctionId({self})")
    }
}

impl FromStr for FunctionId {
    type Err = DerivaError;

    /// Parses `name/version`.
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('/') {
            Some((name, version)) => Self::new(name, version),
            None => Err(DerivaError::InvalidInput(format!(
                "function id {s:?} is not of the form name/version"
            ))),
        }
    }
}

/// A recipe: a function applied to ordered inputs with params. Its address is
/// [`Recipe::addr`].
#[derive(Clone, PartialEq, Eq)]
pub struct Recipe {
    function: FunctionId,
    inputs: Vec<CAddr>,
    params: Params,
}

impl Recipe {
    /// Validates and builds a recipe. Params may come in any order; they are kept sorted by key.
    pub fn new<K, V>(
        function: FunctionId,
        inputs: Vec<CAddr>,
        params: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self>
    where
        K: Into<String>,
        V: Into<String>,
    {
        if inputs.len() > MAX_INPUTS {
            return Err(DerivaError::InvalidInput(format!(
                "a recipe has at most {MAX_INPUTS} inputs, got {}",
                inputs.len()
            )));
        }
        let mut map = Params::new();
        for (k, v) in params {
            let (k, v) = (k.into(), v.into());
            check_param(&k, &v)?;
            if map.insert(k.clone(), v).is_some() {
                return Err(DerivaError::InvalidInput(format!(
                    "param {k:?} is given twice"
                )));
            }
            if map.len() > MAX_PARAMS {
                return Err(DerivaError::InvalidInput(format!(
                    "a recipe has at most {MAX_PARAMS} params"
                )));
            }
        }
        Ok(Self {
            function,
            inputs,
            params: map,
        })
    }

    /// The function to apply.
    pub fn function(&self) -> &FunctionId {
        &self.function
    }

    /// The input addresses, in order.
    pub fn inputs(&self) -> &[CAddr] {
        &self.inputs
    }

    /// The params, sorted by key.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The recipe's address: BLAKE3 in the [`RECIPE_ADDR_CONTEXT`] domain over
    /// [`Recipe::canonical_bytes`].
    pub fn addr(&self) -> CAddr {
        let mut hasher = blake3::Hasher::new_derive_key(RECIPE_ADDR_CONTEXT);
        hasher.update(&self.canonical_bytes());
        CAddr::from_bytes(*hasher.finalize().as_bytes())
    }

    /// The canonical encoding (see the crate docs for the layout).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let params_len: usize = self.params.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(
            1 + 12
                + self.function.name.len()
                + self.function.version.len()
                + ADDR_LEN * self.inputs.len()
                + 4
                + params_len,
        );
        out.push(RECIPE_ENCODING_VERSION);
        put_str(&mut out, &self.function.name);
        put_str(&mut out, &self.function.version);
        put_len(&mut out, self.inputs.len());
        for input in &self.inputs {
            out.extend_from_slice(input.as_bytes());
        }
        put_len(&mut out, self.params.len());
        for (k, v) in &self.params {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        out
    }

    /// Decodes [`Recipe::canonical_bytes`], validating everything [`Recipe::new`] validates.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader {
            bytes,
            pos: 0,
            what: "a recipe encoding",
        };
        let version = r.take(1)?[0];
        if version != RECIPE_ENCODING_VERSION {
            return Err(r.err(format!("unknown encoding version {version}")));
        }
        let name = r.string()?;
        let fversion = r.string()?;
        let function = FunctionId::new(name, fversion)?;
        let n_inputs = r.len()?;
        if n_inputs > MAX_INPUTS {
            return Err(r.err(format!("{n_inputs} inputs")));
        }
        let mut inputs = Vec::with_capacity(n_inputs);
        for _ in 0..n_inputs {
            inputs.push(CAddr::from_slice(r.take(ADDR_LEN)?).map_err(|e| r.err(e))?);
        }
        let n_params = r.len()?;
        let mut params = Vec::with_capacity(n_params.min(MAX_PARAMS));
        let mut last: Option<String> = None;
        for _ in 0..n_params {
            let k = r.string()?;
            let v = r.string()?;
            if last.as_ref().is_some_and(|l| *l >= k) {
                return Err(r.err("params are not in strictly increasing key order"));
            }
            last = Some(k.clone());
            params.push((k, v));
        }
        if r.pos != bytes.len() {
            return Err(r.err(format!("{} trailing bytes", bytes.len() - r.pos)));
        }
        Self::new(function, inputs, params)
    }
}

impl fmt::Debug for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recipe")
            .field("function", &self.function)
            .field("inputs", &self.inputs)
            .field("params", &self.params)
            .finish()
    }
}

fn check_param(k: &str, v: &str) -> Result<()> {
    if k.is_empty() || k.len() > MAX_PARAM_KEY_LEN {
        return Err(DerivaError::InvalidInput(format!(
            "param key must be 1 to {MAX_PARAM_KEY_LEN} bytes, got {}",
            k.len()
        )));
    }
    if k.chars().any(char::is_control) {
        return Err(DerivaError::InvalidInput(format!(
            "param key {k:?} contains a control character"
        )));
    }
    if v.len() > MAX_PARAM_VALUE_LEN {
        return Err(DerivaError::InvalidInput(format!(
            "param {k:?} is {} bytes long; the limit is {MAX_PARAM_VALUE_LEN}",
            v.len()
        )));
    }
    Ok(())
}

pub(crate) fn put_len(out: &mut Vec<u8>, len: usize) {
    // Every length is bounded by the limits above, far below u32::MAX.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// Reads an encoding of `what` (for its errors) from its start.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) pos: usize,
    pub(crate) what: &'static str,
}

impl Reader<'_> {
    pub(crate) fn err(&self, why: impl fmt::Display) -> DerivaError {
        DerivaError::decode(self.what, format!("at byte {}: {why}", self.pos))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.err("truncated"));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn len(&mut self) -> Result<usize> {
        let raw: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| self.err("truncated"))?;
        Ok(u32::from_le_bytes(raw) as usize)
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let raw = self.take(n)?.to_vec();
        String::from_utf8(raw).map_err(|_| self.err("string is not UTF-8"))
    }
}
