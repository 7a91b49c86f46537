//! Real weights in and out. Two [`WeightSource`]s read a model's base weights by their Hugging Face
//! names: a Hugging Face folder (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`) and a GGUF file (every tensor dequantized to f32, GGUF names
//! mapped to Hugging Face's, and the rows of q/k projections un-permuted from GGUF's interleaved
//! RoPE layout to Hugging Face's rotate-half layout). Errors name the file and the tensor.
//!
//! The safetensors reader and writer here are small and streaming: a tensor is read from its byte
//! range in the file, and written one at a time, so neither holds a second copy of a whole model.

use super::model::WeightSource;
use crate::spec::{self, ModelSpec};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where a model's weights are, as found from the `--model` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// A GGUF file (weights, architecture and tokenizer in one).
    Gguf(PathBuf),
    /// A Hugging Face folder with `model.safetensors` or `model.safetensors.index.json`.
    Folder(PathBuf),
}

impl WeightFiles {
    /// The weights `arg` points at: a `.gguf` file, a folder with safetensors weights, or a folder
    /// holding no `config.json` and a single `.gguf` file. `None` for catalog names and folders or
    /// config files without weights (those train from random initialisation).
    pub fn locate(arg: &str) -> Option<Self> {
        let path = Path::new(arg);
        if path.is_file() && spec::is_gguf(path) {
            return Some(Self::Gguf(path.to_path_buf()));
        }
        if !path.is_dir() {
            return None;
        }
        if path.join(INDEX_FILE).is_file() || path.join(SINGLE_FILE).is_file() {
            return Some(Self::Folder(path.to_path_buf()));
        }
        if !path.join("config.json").is_file() {
            return spec::single_gguf_in(path).map(Self::Gguf);
        }
        None
    }

    /// Opens the weights for a model of shape `spec`.
    pub fn open(&self, spec: &ModelSpec) -> Result<Box<dyn WeightSource>> {
        Ok(match self {
            Self::Gguf(path) => Box::new(GgufWeights::open(path, spec)?),
            Self::Folder(path) => Box::new(SafetensorsWeights::open(path)?),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::Folder(p) => p,
        }
    }
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

fn shape_error(file: &Path, name: &str, found: &[usize], expected: &[usize]) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{}: tensor `{name}` has shape {found:?}, the model expects {expected:?}",
        file.display()
    ))
}

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

/// Base weights from a GGUF file, dequantized to f32 one tensor at a time.
pub struct GgufWeights {
    path: PathBuf,
    file: std::fs::File,
    content: Content,
    heads: usize,
    kv_heads: usize,
    /// llama.cpp permutes q/k rows for `llama` (interleaved RoPE), not for `qwen2` (rotate-half).
    unpermute: bool,
}

impl GgufWeights {
    pub fn open(path: &Path, spec: &ModelSpec) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| {
            candle_core::Error::Msg(format!("{}: cannot open: {e}", path.display()))
        })?;
        let content = Content::read(&mut file).map_err(|e| {
            candle_core::Error::Msg(format!("{}: not a readable GGUF file: {e}", path.display()))
        })?;
        let unpermute = matches!(
            content.metadata.get("general.architecture"),
            Some(candle_core::quantized::gguf_file::Value::String(a)) if a == "llama"
        );
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            heads: spec.num_attention_heads,
            kv_heads: spec.num_key_value_heads,
            unpermute,
        })
    }

    pub fn content(&self) -> &Content {
        &self.content
    }
}

/// Which rows of a tensor llama.cpp's converter permuted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permuted {
    No,
    /// Permuted within each of the query heads.
    Query,
    /// Permuted within each of the key/value heads.
    Key,
}

/// The GGUF name of a Hugging Face Llama tensor name, and whether its rows were permuted.
fn gguf_name(hf: &str) -> Option<(String, Permuted)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), Permuted::No)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), Permuted::No)),
        "lm_head.weight" => return Some(("output.weight".into(), Permuted::No)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let (gguf, permuted) = match module {
        "self_attn.q_proj" => ("attn_q", Permuted::Query),
        "self_attn.k_proj" => ("attn_k", Permuted::Key),
        "self_attn.v_proj" => ("attn_v", Permuted::No),
        "self_attn.o_proj" => ("attn_output", Permuted::No),
        "mlp.gate_proj" => ("ffn_gate", Permuted::No),
        "mlp.up_proj" => ("ffn_up", Permuted::No),
        "mlp.down_proj" => ("ffn_down", Permuted::No),
        "input_layernorm" => ("attn_norm", Permuted::No),
        "post_attention_layernorm" => ("ffn_norm", Permuted::No),
        _ => return None,
    };
    Some((format!("blk.{layer}.{gguf}.{suffix}"), permuted))
}

/// Undoes llama.cpp's q/k row permutation: within each head of size `hd`, GGUF row `2i + j` holds
/// Hugging Face row `j·hd/2 + i` (FORMATS.md). Works on weights `[out, in]` and biases `[out]`.
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    if heads == 0 || !out.is_multiple_of(heads) || !(out / heads).is_multiple_of(2) {
        candle_core::bail!("cannot un-permute {out} rows into {heads} heads of even size");
    }
    let half = out / heads / 2;
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The inverse of [`unpermute_rows`]: Hugging Face's layout to GGUF's.
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    if heads == 0 || !out.is_multiple_of(heads) || !(out / heads).is_multiple_of(2) {
        candle_core::bail!("cannot permute {out} rows into {heads} heads of even size");
    }
    let half = out / heads / 2;
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

impl WeightSource for GgufWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (gguf, permuted) = gguf_name(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: no GGUF name is known for tensor `{name}`",
                self.path.display()
            ))
        })?;
        if !self.content.tensor_infos.contains_key(&gguf) {
            candle_core::bail!(
                "{}: the file holds no tensor `{gguf}` (the model's `{name}`, shape {shape:?})",
                self.path.display()
            );
        }
        let q = self
            .content
            .tensor(&mut self.file, &gguf, &Device::Cpu)
            .map_err(|e| {
                candle_core::Error::Msg(format!("{}: tensor `{gguf}`: {e}", self.path.display()))
            })?;
        let t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        if t.dims() != shape {
            return Err(shape_error(&self.path, &gguf, t.dims(), shape));
        }
        match (self.unpermute, permuted) {
            (true, Permuted::Query) => unpermute_rows(&t, self.heads),
            (true, Permuted::Key) => unpermute_rows(&t, self.kv_heads),
            _ => Ok(t),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    begin: u64,
    end: u64,
}

/// The header of one safetensors file: tensor entries and the `__metadata__` map.
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    entries: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsHeader {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }
}

fn st_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

fn st_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        _ => "F32",
    }
}

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {what}: {e}", path.display()))
}

/// Reads the header of the safetensors file at `path`.
pub fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    let mut file = std::fs::File::open(path).map_err(|e| io_error(path, "cannot open", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_error(path, "cannot read", e))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| io_error(path, "not a safetensors file", e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        candle_core::bail!(
            "{}: not a safetensors file (header length {header_len} for a file of {file_len} bytes)",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| io_error(path, "cannot read the header", e))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| io_error(path, "the safetensors header is not JSON", e))?;
    let obj = json
        .as_object()
        .ok_or_else(|| io_error(path, "bad safetensors header", "not a JSON object"))?;
    let data_start = 8 + header_len;
    let mut entries = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in obj {
        if name == "__metadata__" {
            if let Some(m) = value.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let bad = |what: &str| io_error(path, &format!("tensor `{name}`"), what);
        let dtype_name = value["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let dtype =
            st_dtype(dtype_name).ok_or_else(|| bad(&format!("unsupported dtype {dtype_name}")))?;
        let shape: Vec<usize> = value["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("bad shape"))?;
        let offsets = value["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("bad data_offsets"))?;
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if offsets.1 < offsets.0
            || offsets.1 - offsets.0 != bytes as u64
            || data_start + offsets.1 > file_len
        {
            return Err(bad(&format!(
                "data_offsets {offsets:?} do not hold {bytes} bytes inside the file"
            )));
        }
        entries.insert(
            name.clone(),
            Entry {
                dtype,
                shape,
                begin: data_start + offsets.0,
                end: data_start + offsets.1,
            },
        );
    }
    Ok(SafetensorsHeader { entries, metadata })
}

fn read_entry(path: &Path, entry: &Entry, device: &Device) -> Result<Tensor> {
    let mut file = std::fs::File::open(path).map_err(|e| io_error(path, "cannot open", e))?;
    file.seek(SeekFrom::Start(entry.begin))
        .map_err(|e| io_error(path, "cannot seek", e))?;
    let mut bytes = vec![0u8; (entry.end - entry.begin) as usize];
    file.read_exact(&mut bytes)
        .map_err(|e| io_error(path, "cannot read", e))?;
    Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, device)
}

/// Tensors with their names, in file order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Every tensor of the safetensors file at `path`, in its stored dtype, with the file's metadata.
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(NamedTensors, BTreeMap<String, String>)> {
    let header = read_safetensors_header(path)?;
    let tensors = header
        .entries
        .iter()
        .map(|(name, entry)| Ok((name.clone(), read_entry(path, entry, device)?)))
        .collect::<Result<_>>()?;
    Ok((tensors, header.metadata))
}

/// Writes `tensors` as one safetensors file with `metadata`, one tensor at a time. F32, F64, U8,
/// U32 and I64 are stored as they are; F16 and BF16 are widened to F32 (exactly).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let stored = |t: &Tensor| match t.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let dtype = stored(t);
        let bytes = t.elem_count() * dtype.size_in_bytes();
        if header.contains_key(name) {
            candle_core::bail!("{}: tensor `{name}` written twice", path.display());
        }
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": st_dtype_name(dtype),
                "shape": t.dims(),
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| io_error(path, "header", e))?;
    // Pad the header with spaces so the data starts 8-byte aligned, as the reference writer does.
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(|e| io_error(path, "cannot create", e))?;
    let mut out = std::io::BufWriter::new(file);
    let write_err = |e: std::io::Error| io_error(path, "cannot write", e);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(write_err)?;
    out.write_all(&header).map_err(write_err)?;
    for (_, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)?
            .to_dtype(stored(t))?
            .flatten_all()?;
        let bytes: Vec<u8> = match t.dtype() {
            DType::F32 => t
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::F64 => t
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::U8 => t.to_vec1::<u8>()?,
            DType::U32 => t
                .to_vec1::<u32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::I64 => t
                .to_vec1::<i64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            other => candle_core::bail!("cannot store dtype {other:?} in safetensors"),
        };
        out.write_all(&bytes).map_err(write_err)?;
    }
    out.flush().map_err(write_err)?;
    Ok(())
}

/// Base weights from a Hugging Face folder: one `model.safetensors` or the shards of
/// `model.safetensors.index.json`. bf16, f16 and f32 tensors are converted to f32.
pub struct SafetensorsWeights {
    folder: PathBuf,
    /// Tensor name → the shard file holding it.
    shard_of: HashMap<String, PathBuf>,
    headers: HashMap<PathBuf, SafetensorsHeader>,
}

impl SafetensorsWeights {
    pub fn open(folder: &Path) -> Result<Self> {
        let index = folder.join(INDEX_FILE);
        let mut shard_of = HashMap::new();
        let mut headers = HashMap::new();
        if index.is_file() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| io_error(&index, "cannot read", e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| io_error(&index, "invalid JSON", e))?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| io_error(&index, "bad index", "expected a `weight_map` object"))?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    io_error(&index, "bad index", format!("`{name}`: not a file name"))
                })?;
                shard_of.insert(name.clone(), folder.join(file));
            }
            for shard in shard_of.values() {
                if !headers.contains_key(shard) {
                    if !shard.is_file() {
                        candle_core::bail!(
                            "{}: lists shard `{}`, which is missing",
                            index.display(),
                            shard.display()
                        );
                    }
                    headers.insert(shard.clone(), read_safetensors_header(shard)?);
                }
            }
        } else {
            let single = folder.join(SINGLE_FILE);
            let header = read_safetensors_header(&single)?;
            for name in header.names() {
                shard_of.insert(name.to_string(), single.clone());
            }
            headers.insert(single, header);
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            shard_of,
            headers,
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let entry = self
            .shard_of
            .get(name)
            .and_then(|shard| Some((shard, self.headers.get(shard)?.entries.get(name)?)));
        let Some((shard, entry)) = entry else {
            candle_core::bail!(
                "{}: the weights hold no tensor `{name}` (the model expects shape {shape:?})",
                self.folder.display()
            );
        };
        if entry.shape != shape {
            return Err(shape_error(shard, name, &entry.shape, shape));
        }
        if !entry.dtype.is_float() {
            candle_core::bail!(
                "{}: tensor `{name}` has dtype {:?}; expected a float dtype",
                shard.display(),
                entry.dtype
            );
        }
        read_entry(shard, entry, &Device::Cpu)?.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight"),
            Some(("blk.12.attn_q.weight".to_string(), Permuted::Query))
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.bias"),
            Some(("blk.0.attn_k.bias".to_string(), Permuted::Key))
        );
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").map(|x| x.0),
            Some("blk.3.ffn_norm.weight".to_string())
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").map(|x| x.0),
            Some("token_embd.weight".to_string())
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }

    #[test]
    fn unpermute_follows_the_formats_index_map() {
        // Two heads of size 8: within each head GGUF holds HF rows in the order 0,4,1,5,2,6,3,7.
        let hf: Vec<f32> = (0..16).map(|r| r as f32).collect();
        let order = [0, 4, 1, 5, 2, 6, 3, 7];
        let gguf: Vec<f32> = (0..16).map(|r| (r / 8 * 8 + order[r % 8]) as f32).collect();
        let gguf = Tensor::from_vec(gguf, (16, 1), &Device::Cpu).unwrap();
        let back = unpermute_rows(&gguf, 2).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
        let again = permute_rows(&back, 2).unwrap();
        assert_eq!(
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            gguf.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn safetensors_round_trip_and_sharded_folders_name_missing_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[7i64], &Device::Cpu).unwrap();
        let c = a.to_dtype(DType::BF16).unwrap();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.path().join("model-00001-of-00002.safetensors");
        write_safetensors(&path, &[("a".into(), a.clone()), ("step".into(), b)], &meta).unwrap();
        write_safetensors(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &[("c".into(), c)],
            &BTreeMap::new(),
        )
        .unwrap();
        let (tensors, read_meta) = read_safetensors(&path, &Device::Cpu).unwrap();
        assert_eq!(read_meta, meta);
        assert_eq!(tensors[0].0, "a");
        assert_eq!(
            tensors[0].1.to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(tensors[1].1.to_vec1::<i64>().unwrap(), vec![7]);

        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let mut w = SafetensorsWeights::open(dir.path()).unwrap();
        // The bf16 copy of small integers is exact.
        assert_eq!(
            w.tensor("c", &[2, 3]).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        let err = w.tensor("a", &[3, 2]).unwrap_err().to_string();
        assert!(
            err.contains("tensor `a` has shape [2, 3], the model expects [3, 2]"),
            "{err}"
        );
        let err = w.tensor("d", &[1]).unwrap_err().to_string();
        assert!(err.contains("no tensor `d`"), "{err}");
    }
}
