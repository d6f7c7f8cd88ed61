//! A streaming, sharding safetensors writer.
//!
//! The `safetensors` crate serializes from tensors held in memory; this writer takes the list of
//! tensors (name, dtype, shape) first, assigns shards and offsets, writes each shard's header,
//! then takes tensor bytes one at a time. More than one shard adds the index Hugging Face
//! loaders read (`model.safetensors.index.json`).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dtype {
    F32,
    F16,
    I32,
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::I32 => "I32",
        }
    }
    fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            _ => 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl StTensor {
    pub fn new(name: String, dtype: Dtype, shape: Vec<usize>) -> Self {
        StTensor { name, dtype, shape }
    }
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

pub struct ShardedWriter {
    dir: PathBuf,
    tensors: Vec<StTensor>,
    /// Shard of each tensor.
    shard_of: Vec<usize>,
    names: Vec<String>,
    next: usize,
    current: Option<(usize, BufWriter<File>)>,
    total: u64,
}

fn header(tensors: &[(&StTensor, u64)]) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    m.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "writer": "adaptq"}),
    );
    let mut off = 0u64;
    for (t, len) in tensors {
        m.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(m)).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    h
}

impl ShardedWriter {
    /// Plans shards of at most `max_shard` tensor bytes (a larger single tensor gets its own).
    pub fn create(dir: &Path, tensors: Vec<StTensor>, max_shard: u64) -> Result<Self> {
        let mut shard_of = Vec::with_capacity(tensors.len());
        let (mut shard, mut used) = (0usize, 0u64);
        for t in &tensors {
            if used > 0 && used + t.bytes() > max_shard {
                shard += 1;
                used = 0;
            }
            used += t.bytes();
            shard_of.push(shard);
        }
        let n = shard + 1;
        let names = if n == 1 {
            vec!["model.safetensors".to_string()]
        } else {
            (1..=n)
                .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
                .collect()
        };
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(&t.name) {
                bail!("tensor '{}' planned twice", t.name);
            }
        }
        Ok(ShardedWriter {
            dir: dir.to_path_buf(),
            tensors,
            shard_of,
            names,
            next: 0,
            current: None,
            total: 0,
        })
    }

    fn open_shard(&mut self, s: usize) -> Result<()> {
        if let Some((_, mut w)) = self.current.take() {
            w.flush()?;
        }
        let members: Vec<(&StTensor, u64)> = self
            .tensors
            .iter()
            .zip(&self.shard_of)
            .filter(|(_, &k)| k == s)
            .map(|(t, _)| (t, t.bytes()))
            .collect();
        let h = header(&members);
        let p = self.dir.join(&self.names[s]);
        let mut w =
            BufWriter::new(File::create(&p).with_context(|| format!("creating {}", p.display()))?);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        self.current = Some((s, w));
        Ok(())
    }

    /// Writes the next planned tensor's bytes.
    pub fn write_next(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            bail!("more tensors written than planned");
        };
        if t.bytes() != bytes.len() as u64 {
            bail!(
                "tensor '{}': planned {} bytes, got {}",
                t.name,
                t.bytes(),
                bytes.len()
            );
        }
        let s = self.shard_of[self.next];
        if self.current.as_ref().is_none_or(|(k, _)| *k != s) {
            self.open_shard(s)?;
        }
        self.current.as_mut().expect("opened").1.write_all(bytes)?;
        self.total += bytes.len() as u64;
        self.next += 1;
        Ok(())
    }

    /// Closes the last shard and writes the index when sharded; returns the shard file names
    /// and the tensor bytes written.
    pub fn finish(mut self) -> Result<(Vec<String>, u64)> {
        if self.next != self.tensors.len() {
            bail!("{} of {} tensors written", self.next, self.tensors.len());
        }
        if let Some((_, mut w)) = self.current.take() {
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        let mut files = self.names.clone();
        if self.names.len() > 1 {
            let map: serde_json::Map<String, serde_json::Value> = self
                .tensors
                .iter()
                .zip(&self.shard_of)
                .map(|(t, &s)| (t.name.clone(), self.names[s].clone().into()))
                .collect();
            let idx =
                serde_json::json!({"metadata": {"total_size": self.total}, "weight_map": map});
            std::fs::write(
                self.dir.join("model.safetensors.index.json"),
                serde_json::to_vec_pretty(&idx)?,
            )?;
            files.push("model.safetensors.index.json".into());
        }
        Ok((files, self.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_and_index_read_back_with_the_safetensors_layout() {
        let dir = tempfile::tempdir().unwrap();
        let ts = vec![
            StTensor::new("a".into(), Dtype::F32, vec![2, 3]),
            StTensor::new("b".into(), Dtype::I32, vec![4]),
            StTensor::new("c".into(), Dtype::F16, vec![5]),
        ];
        let mut w = ShardedWriter::create(dir.path(), ts, 30).unwrap();
        w.write_next(&[1; 24]).unwrap();
        w.write_next(&[2; 16]).unwrap();
        assert!(w.write_next(&[3; 9]).is_err());
        w.write_next(&[3; 10]).unwrap();
        let (files, total) = w.finish().unwrap();
        assert_eq!(total, 50);
        assert_eq!(files.len(), 3, "{files:?}");
        let idx: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let shard = idx["weight_map"]["b"].as_str().unwrap();
        let bytes = std::fs::read(dir.path().join(shard)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let off = &h["b"]["data_offsets"];
        let (s, e) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        assert_eq!(&bytes[8 + n + s..8 + n + e], &[2; 16]);
        assert_eq!(h["b"]["dtype"], "I32");
    }
}
