//! Calibration activations: every window's hidden states at one point of the network. They are
//! held in memory while they fit under a limit, and otherwise spilled to an unnamed scratch
//! file (it vanishes with the process, even a killed one) and read back one window at a time,
//! so a model with many long windows is calibrated in the memory of its largest block. Spilling
//! changes no value: f32 bytes go out and come back as they were.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Where activations go when they do not fit.
#[derive(Debug, Clone)]
pub struct Spill {
    /// Folder of the scratch files.
    pub dir: PathBuf,
    /// Largest size of one set of activations held in memory, in bytes.
    pub limit: u64,
}

impl Spill {
    /// The default limit: a quarter of the memory available now (a block's work holds the
    /// inputs and outputs of the block at once, next to its weights and statistics).
    pub fn default_limit() -> u64 {
        let avail = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| kib.saturating_mul(1024));
        avail.map_or(4 << 30, |b| b / 4)
    }
}

/// Something that hands out calibration windows one at a time.
pub trait Windows {
    fn count(&self) -> usize;
    /// Bytes of the windows' f32 values.
    fn bytes(&self) -> u64;
    /// Calls `f` on each window in order.
    fn each(&self, f: &mut dyn FnMut(&Tensor) -> Result<()>) -> Result<()>;
}

impl Windows for Vec<Tensor> {
    fn count(&self) -> usize {
        self.len()
    }
    fn bytes(&self) -> u64 {
        held_bytes(self)
    }
    fn each(&self, f: &mut dyn FnMut(&Tensor) -> Result<()>) -> Result<()> {
        self.iter().try_for_each(f)
    }
}

/// One set of calibration activations.
pub enum Acts {
    Held(Vec<Tensor>),
    Spilled(Spilled),
}

/// Activations in a scratch file: each window's f32 values at an offset, with its shape.
pub struct Spilled {
    file: std::fs::File,
    windows: Vec<(u64, Vec<usize>)>,
    bytes: u64,
}

impl Spilled {
    fn create(spill: &Spill) -> Result<Spilled> {
        let file = tempfile::tempfile_in(&spill.dir).with_context(|| {
            format!(
                "creating a scratch file for activations in {}",
                spill.dir.display()
            )
        })?;
        Ok(Spilled {
            file,
            windows: Vec::new(),
            bytes: 0,
        })
    }

    fn push(&mut self, x: &Tensor) -> Result<()> {
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        let bytes: &[u8] = bytemuck::cast_slice(&v);
        (&self.file)
            .write_all(bytes)
            .context("writing activations to the scratch file")?;
        self.windows.push((self.bytes, x.dims().to_vec()));
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn get(&self, i: usize) -> Result<Tensor> {
        let (at, dims) = &self.windows[i];
        let mut v = vec![0f32; dims.iter().product()];
        self.file
            .read_exact_at(bytemuck::cast_slice_mut(&mut v), *at)
            .context("reading activations back from the scratch file")?;
        Ok(Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?)
    }
}

impl Windows for Acts {
    fn count(&self) -> usize {
        match self {
            Acts::Held(xs) => xs.len(),
            Acts::Spilled(s) => s.windows.len(),
        }
    }
    fn bytes(&self) -> u64 {
        Acts::bytes(self)
    }
    fn each(&self, f: &mut dyn FnMut(&Tensor) -> Result<()>) -> Result<()> {
        match self {
            Acts::Held(xs) => xs.each(f),
            Acts::Spilled(s) => (0..s.windows.len()).try_for_each(|i| f(&s.get(i)?)),
        }
    }
}

impl Acts {
    /// Bytes of f32 values held or spilled.
    pub fn bytes(&self) -> u64 {
        match self {
            Acts::Held(xs) => held_bytes(xs),
            Acts::Spilled(s) => s.bytes,
        }
    }

    pub fn is_spilled(&self) -> bool {
        matches!(self, Acts::Spilled(_))
    }

    /// An empty set to [`Acts::push`] windows into as they are made elsewhere (a hook): held,
    /// or spilled when the `bytes` expected do not fit under `spill`'s limit.
    pub fn sink(bytes: u64, spill: Option<&Spill>) -> Result<Acts> {
        Ok(match spill.filter(|s| bytes > s.limit) {
            Some(s) => Acts::Spilled(Spilled::create(s)?),
            None => Acts::Held(Vec::new()),
        })
    }

    /// Adds a window at the end.
    pub fn push(&mut self, x: &Tensor) -> Result<()> {
        match self {
            Acts::Held(xs) => xs.push(x.clone()),
            Acts::Spilled(s) => s.push(x)?,
        }
        Ok(())
    }

    /// `count` windows made by `f`, held or, when their `bytes` do not fit under `spill`'s
    /// limit, spilled one by one as they are made.
    pub fn build(
        count: usize,
        bytes: u64,
        spill: Option<&Spill>,
        f: &mut dyn FnMut(usize) -> Result<Tensor>,
    ) -> Result<Acts> {
        match spill.filter(|s| bytes > s.limit) {
            Some(s) => {
                let mut out = Spilled::create(s)?;
                for i in 0..count {
                    out.push(&f(i)?)?;
                }
                Ok(Acts::Spilled(out))
            }
            None => Ok(Acts::Held((0..count).map(f).collect::<Result<_>>()?)),
        }
    }

    /// These activations, spilled when they do not fit under `spill`'s limit.
    pub fn placed(self, spill: Option<&Spill>) -> Result<Acts> {
        match self {
            Acts::Held(xs) => {
                let bytes = held_bytes(&xs);
                let mut xs = xs.into_iter();
                Acts::build(xs.len(), bytes, spill, &mut |_| {
                    xs.next().context("fewer windows than counted")
                })
            }
            spilled => Ok(spilled),
        }
    }

    /// `f` of every window, in order: held, or spilled when these activations (the same size
    /// as the outputs of a block) do not fit under `spill`'s limit.
    pub fn map(
        &self,
        spill: Option<&Spill>,
        f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Acts> {
        match self {
            Acts::Held(xs) => Acts::build(xs.len(), self.bytes(), spill, &mut |i| f(&xs[i])),
            Acts::Spilled(s) => {
                Acts::build(s.windows.len(), s.bytes, spill, &mut |i| f(&s.get(i)?))
            }
        }
    }
}

fn held_bytes(xs: &[Tensor]) -> u64 {
    xs.iter().map(|x| x.elem_count() as u64 * 4).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_windows_come_back_bit_for_bit() {
        let d = tempfile::tempdir().unwrap();
        let xs: Vec<Tensor> = (0..3)
            .map(|k| {
                let v: Vec<f32> = (0..20).map(|i| (i * k) as f32 * 0.1 - 1.0).collect();
                Tensor::from_vec(v, (4, 5), &Device::Cpu).unwrap()
            })
            .collect();
        let spill = Spill {
            dir: d.path().to_path_buf(),
            limit: 100,
        };
        let held = Acts::Held(xs.clone());
        let spilled = Acts::Held(xs.clone()).placed(Some(&spill)).unwrap();
        assert!(spilled.is_spilled(), "240 bytes over a 100-byte limit");
        assert!(
            std::fs::read_dir(d.path()).unwrap().next().is_none(),
            "no named file"
        );
        let double = |x: &Tensor| Ok((x * 2.0)?);
        let a = held.map(None, &mut { double }).unwrap();
        let b = spilled.map(Some(&spill), &mut { double }).unwrap();
        assert!(!a.is_spilled() && b.is_spilled());
        let values = |acts: &Acts| {
            let mut v = Vec::new();
            acts.each(&mut |x| {
                v.push(x.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            })
            .unwrap();
            v
        };
        let (va, vb) = (values(&a), values(&b));
        assert_eq!(va, vb);
        let roomy = Spill {
            limit: 1 << 20,
            ..spill
        };
        assert!(!Acts::Held(xs).placed(Some(&roomy)).unwrap().is_spilled());
    }
}
