//! A calibrated run's durable state, block by block: the codes of every block calibrated so far
//! and the activations entering the next one. A run keeps it beside its output
//! (`OUT.checkpoint/`) so `--resume` continues after a crash; a block-range job (`--blocks
//! A..B`) writes the same folder as its result, a *part*, and `adaptq merge` joins parts into
//! the bundle one run would have written.
//!
//! Folder layout: `state.json` (what run this is, how far it got, the SHA-256 of every other
//! file), `block-NNNNN.bin` (one block's calibrated layers, folded norms and AWQ search,
//! postcard-encoded), `tail.bin` (the embedding or head calibrated after the last block),
//! `acts-NNNNN.bin` (the inputs of block NNNNN: a small header, then little-endian f32). Each
//! file is written under a temporary name, synced and renamed; `state.json` is rewritten after
//! the files it names, and the activations it no longer names are deleted after it: a run
//! killed at any instant leaves a folder whose `state.json` describes files that are whole.

use crate::acts::{Acts, Spill};
use crate::calibrate::{AwqGroup, CalibInfo, CalibratedLayer, Calibration};
use crate::options::QuantizeOptions;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The `format` of every state file this version writes and reads.
const FORMAT: &str = "adaptq-calibration-part/1";
pub const STATE: &str = "state.json";
const TAIL: &str = "tail.bin";
const LOCK: &str = "lock";
const ACTS_MAGIC: &[u8; 8] = b"AQACTS1\0";
/// Largest state.json read.
const STATE_LIMIT: u64 = 16 << 20;
/// Most blocks a state may name (block files have five digits).
const MAX_BLOCKS: usize = 99_999;

/// What run a folder belongs to and how far it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    /// Equal for every job of one run and different for any other: the options that decide
    /// the bundle's bytes, the calibration windows, the source's tensors, adaptq's version.
    pub fingerprint: String,
    /// The run's options (local paths made absolute, so `merge` runs from anywhere).
    pub options: QuantizeOptions,
    /// What the manifest records as the source (the name the user gave, not the absolute path).
    pub locator: String,
    pub calib: CalibInfo,
    /// Blocks in the model.
    pub blocks: usize,
    /// The blocks this folder is for.
    pub start: usize,
    pub end: usize,
    /// Blocks `start..done` are saved, and `acts.bin` holds block `done`'s inputs.
    pub done: usize,
    /// The embedding or head, calibrated after the last block, is saved (`end == blocks`).
    pub tail_done: bool,
    /// SHA-256 of each block, tail and activations file this state names.
    pub hashes: std::collections::BTreeMap<String, String>,
}

impl State {
    /// Every block of the range and, for the last range, the tail are saved.
    pub fn complete(&self) -> bool {
        self.done == self.end && (self.end < self.blocks || self.tail_done)
    }
}

/// One calibrated layer as saved: [`CalibratedLayer`] with its method by name.
#[derive(Serialize, Deserialize)]
struct LayerRecord {
    q: adaptq_quant::LayerCodes,
    method: String,
    col_scale: Option<Vec<f32>>,
    row_scale: Option<Vec<f32>>,
    output_rel_error: f64,
    rtn_output_rel_error: f64,
    scaled_weight: Option<Vec<f32>>,
    refit_error_reduction: Option<f64>,
    novaq: Option<adaptq_quant::novaq::NovaqReport>,
    reference_weight: Option<Vec<f32>>,
}

/// What one block (or the tail) added to the calibration.
#[derive(Serialize, Deserialize)]
struct Record {
    layers: Vec<(String, LayerRecord)>,
    overrides: Vec<(String, Vec<f32>)>,
    awq: Vec<AwqGroup>,
    experts: Vec<crate::experts::ExpertRecord>,
}

/// Methods a calibrated layer can name; a saved name maps back onto one of these.
const METHODS: &[&str] = &["rtn", "gptq", "awq+rtn", "awq+gptq", "novaq", "awq+novaq"];

impl Record {
    fn of(cal: &Calibration) -> Result<Record> {
        if !cal.hessians.is_empty() || cal.mix.is_some() {
            bail!("a checkpoint holds codes, not Hessians or a type mix");
        }
        let layers = cal
            .layers
            .iter()
            .map(|(n, c)| {
                let r = LayerRecord {
                    q: c.q.clone(),
                    method: c.method.to_string(),
                    col_scale: c.col_scale.clone(),
                    row_scale: c.row_scale.clone(),
                    output_rel_error: c.output_rel_error,
                    rtn_output_rel_error: c.rtn_output_rel_error,
                    scaled_weight: c.scaled_weight.clone(),
                    refit_error_reduction: c.refit_error_reduction,
                    novaq: c.novaq,
                    reference_weight: c.reference_weight.clone(),
                };
                (n.clone(), r)
            })
            .collect();
        Ok(Record {
            layers,
            overrides: cal
                .overrides
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            awq: cal.awq.clone(),
            experts: cal.experts.clone(),
        })
    }

    fn into_calibration(self) -> Result<Calibration> {
        let mut cal = Calibration::default();
        for (name, r) in self.layers {
            check_codes(&r.q).with_context(|| format!("layer '{name}'"))?;
            let method = METHODS
                .iter()
                .copied()
                .find(|m| *m == r.method)
                .with_context(|| format!("layer '{name}': unknown method '{}'", r.method))?;
            let c = CalibratedLayer {
                q: r.q,
                method,
                col_scale: r.col_scale,
                row_scale: r.row_scale,
                output_rel_error: r.output_rel_error,
                rtn_output_rel_error: r.rtn_output_rel_error,
                scaled_weight: r.scaled_weight,
                refit_error_reduction: r.refit_error_reduction,
                novaq: r.novaq,
                reference_weight: r.reference_weight,
            };
            cal.layers.insert(name, c);
        }
        cal.overrides = self.overrides.into_iter().collect();
        cal.awq = self.awq;
        cal.experts = self.experts;
        Ok(cal)
    }
}

/// Largest tensor a record may describe (2^36 values): a damaged or crafted record must not
/// ask for more before its shape is compared with the source's.
const MAX_VALUES: usize = 1 << 36;

/// Refuses codes whose parts do not fit their shape, before anything decodes them.
fn check_codes(q: &adaptq_quant::LayerCodes) -> Result<()> {
    use adaptq_quant::LayerCodes;
    let numel = q
        .rows()
        .checked_mul(q.cols())
        .filter(|&n| n <= MAX_VALUES)
        .context("its shape is out of range")?;
    let fits = match q {
        LayerCodes::Int(t) => {
            let groups = t.rows * adaptq_quant::groups_per_row(t.cols, t.group_size);
            let mins = match t.grid {
                adaptq_quant::Grid::Symmetric => 0,
                adaptq_quant::Grid::Asymmetric => groups,
            };
            (1..=8).contains(&t.bits)
                && t.codes.len() == (numel * t.bits as usize).div_ceil(8)
                && t.scales.len() == groups
                && t.mins.len() == mins
        }
        LayerCodes::Ggml {
            ty, cols, bytes, ..
        } => {
            cols % ty.block_len() == 0
                && bytes.len() == q.rows() * (cols / ty.block_len()) * ty.block_bytes()
        }
        LayerCodes::Codebook(c) => c.try_dequantize().is_some(),
    };
    if !fits {
        bail!("its codes do not fit its shape {} x {}", q.rows(), q.cols());
    }
    Ok(())
}

/// Bytes of each tensor of a local source read into the fingerprint: enough to tell a model
/// from its fine-tune, cheap on a 16 GB file (one page per tensor).
const SAMPLE: usize = 4096;

/// The fingerprint of a run: `recorded` options (those that decide the bytes), the calibration
/// windows, the source as the manifest names it (a hub locator carries its commit), its tensor
/// list and, for a local file, the first bytes of every tensor (a remote source is not read
/// for it: that would fetch every tensor).
pub fn fingerprint(
    recorded: &serde_json::Value,
    calib: &CalibInfo,
    src: &dyn adaptq_source::TensorSource,
    locator: &str,
) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update(build_id().as_bytes());
    h.update(serde_json::to_vec(recorded)?);
    h.update(serde_json::to_vec(calib)?);
    h.update(locator.as_bytes());
    let local = locator.starts_with("file:");
    for t in src.tensors() {
        let line = format!(
            "{}|{:?}|{}|{}\n",
            t.name,
            t.shape,
            t.dtype.name(),
            t.byte_len
        );
        h.update(line.as_bytes());
        if local {
            let raw = src.raw_bytes(&t.name)?;
            h.update(&raw[..raw.len().min(SAMPLE)]);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The running program's SHA-256: two builds whose code differs may write different codes for
/// the same block, so a checkpoint or part is taken up only by the build that wrote it (the
/// version number alone does not change between development builds).
fn build_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::env::current_exe()
            .and_then(std::fs::read)
            .map(|b| sha256(&b))
            .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_string())
    })
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A saved block (or tail) file: where it is and the SHA-256 its state recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedFile {
    pub path: PathBuf,
    pub sha256: String,
}

impl SavedFile {
    /// The calibration the file holds, codes included, after checking its hash and every
    /// layer's parts against its shape.
    pub fn read(&self) -> Result<Calibration> {
        let path = &self.path;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if sha256(&bytes) != self.sha256 {
            bail!(
                "{} is damaged (its SHA-256 is not the one {STATE} recorded)",
                path.display()
            );
        }
        let rec: Record = postcard::from_bytes(&bytes)
            .with_context(|| format!("{} is damaged", path.display()))?;
        drop(bytes);
        rec.into_calibration()
            .with_context(|| format!("{}", path.display()))
    }
}

/// A checkpoint or part folder, locked by this process while it is open.
pub struct Checkpoint {
    dir: PathBuf,
    pub state: State,
    _lock: std::fs::File,
}

fn block_file(b: usize) -> String {
    format!("block-{b:05}.bin")
}

fn acts_file(b: usize) -> String {
    format!("acts-{b:05}.bin")
}

/// Whether `name` is a file a checkpoint folder holds (or its temporary name while written).
fn ours(name: &str) -> bool {
    let name = name.strip_suffix(".tmp").unwrap_or(name);
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".bin"))
            .is_some_and(|d| d.len() == 5 && d.bytes().all(|c| c.is_ascii_digit()))
    };
    numbered("block-") || numbered("acts-") || [STATE, TAIL, LOCK].contains(&name)
}

/// Writes `bytes` to `dir/name` durably: a temporary file, synced, renamed over the name.
/// Returns the bytes' SHA-256.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<String> {
    write_with(dir, name, &mut |w| Ok(w.write_all(bytes)?))
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: sha2::Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// [`write_file`] with the contents written by `fill`.
fn write_with(
    dir: &Path,
    name: &str,
    fill: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
) -> Result<String> {
    use sha2::Digest;
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = Hashing {
        inner: std::io::BufWriter::with_capacity(1 << 20, f),
        hash: sha2::Sha256::new(),
    };
    fill(&mut w).with_context(|| format!("writing {}", tmp.display()))?;
    let hash = hex::encode(w.hash.finalize());
    let f = w.inner.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    // The rename is durable once the folder is.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(hash)
}

impl Checkpoint {
    /// Creates the folder `dir` (which must not exist) for `state`: built under a temporary
    /// name and renamed, so a folder at `dir` always has its state file.
    pub fn create(dir: &Path, state: State) -> Result<Checkpoint> {
        let name = dir
            .file_name()
            .with_context(|| format!("{} names no folder", dir.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".creating-{}", std::process::id()));
        let tmp = dir.with_file_name(tmp_name);
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let built = (|| {
            let lock = Self::lock(&tmp)?;
            write_file(&tmp, STATE, &serde_json::to_vec_pretty(&state)?)?;
            std::fs::rename(&tmp, dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok(lock)
        })();
        let lock = match built {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state,
            _lock: lock,
        })
    }

    /// Opens the checkpoint or part at `dir`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let lock = Self::lock(dir)?;
        let bytes =
            adaptq_source::blob::read_small(&dir.join(STATE), STATE_LIMIT).with_context(|| {
                format!("{} is not a calibration checkpoint or part", dir.display())
            })?;
        let state: State = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", dir.join(STATE).display()))?;
        if state.format != FORMAT {
            bail!(
                "{}: written by another version of adaptq ({}, this one reads {FORMAT})",
                dir.display(),
                state.format
            );
        }
        let ordered = state.start <= state.done && state.done <= state.end;
        if !(ordered && state.end <= state.blocks && state.blocks <= MAX_BLOCKS) {
            bail!("{}: inconsistent block counts in {STATE}", dir.display());
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state,
            _lock: lock,
        })
    }

    /// Whether `dir` holds a checkpoint folder: a state file of this format.
    pub fn is_checkpoint(dir: &Path) -> bool {
        adaptq_source::blob::read_small(&dir.join(STATE), STATE_LIMIT)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["format"] == FORMAT)
    }

    /// Removes a checkpoint folder adaptq wrote, holding its lock (a live run's is refused):
    /// refused when it holds anything but plain files of a checkpoint. The state file goes
    /// last, so a removal cut short leaves a folder that is still recognised.
    pub fn remove(dir: &Path) -> Result<()> {
        if !Self::is_checkpoint(dir) {
            bail!(
                "{} is not a calibration checkpoint; left alone",
                dir.display()
            );
        }
        let lock = Self::lock(dir)?;
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !ours(&name) || !e.file_type()?.is_file() {
                bail!(
                    "{} holds '{name}', which adaptq did not write there; left alone",
                    dir.display()
                );
            }
            names.push(name);
        }
        names.sort_by_key(|n| n == STATE);
        for n in names {
            std::fs::remove_file(dir.join(&n))
                .with_context(|| format!("removing {}", dir.join(&n).display()))?;
        }
        drop(lock);
        std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
    }

    /// Takes the folder's lock, so two runs never write one checkpoint.
    fn lock(dir: &Path) -> Result<std::fs::File> {
        let path = dir.join(LOCK);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.try_lock()
            .map_err(|_| anyhow::anyhow!("{} is in use by another adaptq run", dir.display()))?;
        Ok(f)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_state(&self) -> Result<()> {
        write_file(&self.dir, STATE, &serde_json::to_vec_pretty(&self.state)?)?;
        Ok(())
    }

    /// Saves block `b`'s calibration and the next block's inputs `xs`; the previous inputs are
    /// deleted once the state no longer names them. Returns `cal` with its codes released to
    /// the saved file ([`Calibration::saved`]).
    pub fn save_block(
        &mut self,
        b: usize,
        cal: Calibration,
        xs: &dyn crate::acts::Windows,
    ) -> Result<Calibration> {
        if b != self.state.done || b >= self.state.end {
            bail!("block {b} saved out of order (next is {})", self.state.done);
        }
        let bytes = postcard::to_stdvec(&Record::of(&cal)?)?;
        let h = write_file(&self.dir, &block_file(b), &bytes)?;
        drop(bytes);
        let saved = self.release(&block_file(b), &h, cal);
        self.state.hashes.insert(block_file(b), h);
        let h = write_acts(&self.dir, b + 1, xs)?;
        self.state.hashes.insert(acts_file(b + 1), h);
        let old = self.state.hashes.remove(&acts_file(b));
        self.state.done = b + 1;
        self.write_state()?;
        if old.is_some() {
            remove_if_there(&self.dir.join(acts_file(b)))?;
        }
        Ok(saved)
    }

    /// Saves the embedding or head calibrated after the last block; returns `cal` with its
    /// codes released as [`Checkpoint::save_block`]'s.
    pub fn save_tail(&mut self, cal: Calibration) -> Result<Calibration> {
        let h = write_file(&self.dir, TAIL, &postcard::to_stdvec(&Record::of(&cal)?)?)?;
        let saved = self.release(TAIL, &h, cal);
        self.state.hashes.insert(TAIL.into(), h);
        self.state.tail_done = true;
        self.write_state()?;
        Ok(saved)
    }

    /// `cal` with each held layer replaced by its report and the file `name` (SHA-256
    /// `hash`) that holds its codes.
    fn release(&self, name: &str, hash: &str, mut cal: Calibration) -> Calibration {
        let file = SavedFile {
            path: self.dir.join(name),
            sha256: hash.to_string(),
        };
        let held = std::mem::take(&mut cal.layers);
        cal.saved.extend(
            held.into_iter()
                .map(|(n, c)| (n, (file.clone(), c.summary()))),
        );
        cal
    }

    /// The calibration saved so far (blocks `start..done`, then the tail), its codes left in
    /// their files: each file is read and checked once here, one at a time.
    pub fn calibration(&self) -> Result<Calibration> {
        let mut cal = Calibration::default();
        let tail = self.state.tail_done.then(|| TAIL.to_string());
        for name in (self.state.start..self.state.done)
            .map(block_file)
            .chain(tail)
        {
            let hash = self
                .state
                .hashes
                .get(&name)
                .with_context(|| format!("{}: {STATE} names no {name}", self.dir.display()))?;
            let file = SavedFile {
                path: self.dir.join(&name),
                sha256: hash.clone(),
            };
            cal.absorb(self.release(&name, hash, file.read()?));
        }
        Ok(cal)
    }

    /// The inputs of block `done`, placed in memory or `spill`'s scratch as they fit.
    pub fn acts(&self, spill: Option<&Spill>) -> Result<Acts> {
        let name = acts_file(self.state.done);
        let path = self.dir.join(&name);
        let want = self.state.hashes.get(&name).with_context(|| {
            format!(
                "{}: no saved inputs of block {}",
                self.dir.display(),
                self.state.done
            )
        })?;
        read_acts(&path, self.state.done, want, spill)
    }

    /// Drops the saved activations (the last range's: no block reads them).
    pub fn drop_acts(&mut self) -> Result<()> {
        let name = acts_file(self.state.done);
        if self.state.hashes.remove(&name).is_some() {
            self.write_state()?;
        }
        remove_if_there(&self.dir.join(name))
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("removing {}", path.display())))
        }
        _ => Ok(()),
    }
}

/// Writes `xs` (block `b`'s inputs) as `acts-NNNNN.bin`; returns its SHA-256.
fn write_acts(dir: &Path, b: usize, xs: &dyn crate::acts::Windows) -> Result<String> {
    write_with(dir, &acts_file(b), &mut |w| {
        w.write_all(ACTS_MAGIC)?;
        w.write_all(&(b as u64).to_le_bytes())?;
        w.write_all(&(xs.count() as u64).to_le_bytes())?;
        xs.each(&mut |x| {
            let dims = x.dims();
            w.write_all(&(dims.len() as u64).to_le_bytes())?;
            for &d in dims {
                w.write_all(&(d as u64).to_le_bytes())?;
            }
            let v = x.flatten_all()?.to_vec1::<f32>()?;
            w.write_all(bytemuck::cast_slice(&v))?;
            Ok(())
        })
    })
}

/// Reads an activations file, checking it holds block `b`'s inputs, that every size fits the
/// file and that its SHA-256 is `want`.
fn read_acts(path: &Path, b: usize, want: &str, spill: Option<&Spill>) -> Result<Acts> {
    use sha2::Digest;
    let named = || format!("{}", path.display());
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", named()))?;
    let mut left = f.metadata()?.len();
    let mut r = HashingReader {
        inner: std::io::BufReader::with_capacity(1 << 20, f),
        hash: sha2::Sha256::new(),
    };
    type R = HashingReader<std::io::BufReader<std::fs::File>>;
    let u64_at = |r: &mut R, left: &mut u64| -> Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)
            .with_context(|| format!("{} is cut short", named()))?;
        *left = left.saturating_sub(8);
        Ok(u64::from_le_bytes(b))
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .with_context(|| format!("{} is cut short", named()))?;
    left = left.saturating_sub(8);
    if &magic != ACTS_MAGIC {
        bail!("{} is not an activations file", named());
    }
    let block = u64_at(&mut r, &mut left)?;
    if block != b as u64 {
        bail!("{} holds block {block}'s inputs, not block {b}'s", named());
    }
    let n = u64_at(&mut r, &mut left)?;
    // Every window is at least its 16-byte header: a count beyond that is damage.
    let count = usize::try_from(n)
        .ok()
        .filter(|&c| (c as u64).saturating_mul(16) <= left)
        .with_context(|| format!("{}: {n} windows cannot fit in the file", named()))?;
    // Windows are read one at a time into memory or the scratch file, as they fit.
    let xs = Acts::build(count, left, spill, &mut |_| {
        let nd = u64_at(&mut r, &mut left)?;
        if nd == 0 || nd > 4 {
            bail!("{}: a tensor of {nd} dimensions", named());
        }
        let mut dims = Vec::new();
        let mut numel: u64 = 1;
        for _ in 0..nd {
            let d = u64_at(&mut r, &mut left)?;
            numel = numel
                .checked_mul(d)
                .with_context(|| format!("{}: tensor size overflows", named()))?;
            dims.push(usize::try_from(d)?);
        }
        let bytes = numel
            .checked_mul(4)
            .filter(|&b| b <= left)
            .with_context(|| format!("{}: a tensor larger than the file", named()))?;
        let mut v = vec![0f32; usize::try_from(numel)?];
        r.read_exact(bytemuck::cast_slice_mut(&mut v))?;
        left -= bytes;
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    })?;
    if left != 0 {
        bail!("{} has {left} bytes after its last tensor", named());
    }
    if hex::encode(r.hash.finalize()) != want {
        bail!(
            "{} is damaged (its SHA-256 is not the one {STATE} recorded)",
            named()
        );
    }
    Ok(xs)
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// How a calibrated run saves its progress and where it starts.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The checkpoint folder: `OUT.checkpoint` for a whole run, the part itself for a range.
    pub dir: PathBuf,
    /// A block-range job: the folder is its result and stays.
    pub range: Option<Range<usize>>,
    pub resume: bool,
    pub force: bool,
    /// Each block calibrated on the float model's activations.
    pub fp_inputs: bool,
    /// The part ending where this range starts.
    pub inputs_from: Option<PathBuf>,
    /// Saved whole in the state, so `merge` can rebuild the run.
    pub options: QuantizeOptions,
    /// The options that decide the bytes ([`QuantizeOptions::recorded`]).
    pub recorded: serde_json::Value,
    /// The source as the manifest records it.
    pub locator: String,
}

/// Where a calibrated pass picks up.
pub struct Begin {
    pub checkpoint: Checkpoint,
    /// Saved calibration of the blocks before `from`.
    pub done: Calibration,
    /// Inputs of block `from`, when saved ones are used; `None`: embed the windows (and, for
    /// a float-input range after block 0, run the float blocks before it).
    pub xs: Option<Acts>,
    pub from: usize,
    pub end: usize,
}

impl JobPlan {
    /// Opens or creates the checkpoint for a run over `blocks` blocks with windows `calib`.
    pub fn begin(
        &self,
        src: &dyn adaptq_source::TensorSource,
        calib: &CalibInfo,
        blocks: usize,
        spill: Option<&Spill>,
    ) -> Result<Begin> {
        let fp = fingerprint(&self.recorded, calib, src, &self.locator)?;
        let range = self.range.clone().unwrap_or(0..blocks);
        if range.start >= range.end || range.end > blocks {
            bail!(
                "block range {}..{} is not within the model's {blocks} blocks",
                range.start,
                range.end
            );
        }
        if std::fs::symlink_metadata(&self.dir).is_ok() {
            if !Checkpoint::is_checkpoint(&self.dir) {
                // Nothing else is ever created at a checkpoint's name.
                bail!(
                    "{} exists and is not a calibration checkpoint adaptq wrote; move it away",
                    self.dir.display()
                );
            }
            if self.resume {
                let cp = Checkpoint::open(&self.dir)?;
                let s = &cp.state;
                if s.fingerprint != fp {
                    bail!(
                        "the checkpoint at {} is of another run (other settings, calibration \
                         text or model): run without --resume and with --force to start over",
                        self.dir.display()
                    );
                }
                if s.start != range.start || s.end != range.end {
                    bail!(
                        "the checkpoint at {} is for blocks {}..{}, not {}..{}",
                        self.dir.display(),
                        s.start,
                        s.end,
                        range.start,
                        range.end
                    );
                }
                if s.blocks != blocks {
                    bail!(
                        "the checkpoint at {} is of a {}-block model",
                        self.dir.display(),
                        s.blocks
                    );
                }
                if s.done > s.start {
                    let xs = if s.done < s.end || !s.tail_done && s.end == blocks {
                        Some(cp.acts(spill)?)
                    } else {
                        None
                    };
                    return Ok(Begin {
                        done: cp.calibration()?,
                        xs,
                        from: s.done,
                        end: s.end,
                        checkpoint: cp,
                    });
                }
                drop(cp);
            } else if !self.force {
                bail!(
                    "a checkpoint of an earlier run is at {}: add --resume to continue it, or \
                     --force to start over",
                    self.dir.display()
                );
            }
            Checkpoint::remove(&self.dir)?;
        }
        let xs = match (&self.inputs_from, range.start, self.fp_inputs) {
            (_, 0, _) | (None, _, true) => None,
            (Some(_), _, true) => {
                bail!("--inputs-from is for calib_inputs quantized; fp ranges start on their own")
            }
            (None, a, false) => bail!(
                "blocks {a}..{}: a range after block 0 is calibrated on the quantized outputs \
                 of the blocks before it: give the part that ends at block {a} \
                 (--inputs-from), or use --calib-inputs fp",
                range.end
            ),
            (Some(p), a, false) => {
                let prev = Checkpoint::open(p)?;
                let s = &prev.state;
                if s.fingerprint != fp {
                    bail!("{} is a part of another run", p.display());
                }
                if s.end != a || !s.complete() {
                    bail!(
                        "{} holds blocks {}..{} ({} done); this range starts at block {a}",
                        p.display(),
                        s.start,
                        s.end,
                        s.done
                    );
                }
                Some(prev.acts(spill)?)
            }
        };
        let mut options = self.options.clone();
        absolute_paths(&mut options)?;
        let state = State {
            format: FORMAT.into(),
            fingerprint: fp,
            options,
            locator: self.locator.clone(),
            calib: calib.clone(),
            blocks,
            start: range.start,
            end: range.end,
            done: range.start,
            tail_done: false,
            hashes: Default::default(),
        };
        Ok(Begin {
            checkpoint: Checkpoint::create(&self.dir, state)?,
            done: Calibration::default(),
            xs,
            from: range.start,
            end: range.end,
        })
    }
}

/// Makes the local paths in `o` absolute, so a merge elsewhere finds the same files.
fn absolute_paths(o: &mut QuantizeOptions) -> Result<()> {
    if let Some(src) = &o.src {
        if !src.contains("://") {
            o.src = Some(std::path::absolute(src)?.to_string_lossy().into_owned());
        }
    }
    if let Some(c) = &o.calibration.calib {
        o.calibration.calib = Some(std::path::absolute(c)?);
    }
    Ok(())
}

/// The parts of one run, checked to cover every block once and in order.
pub fn open_parts(dirs: &[PathBuf]) -> Result<Vec<Checkpoint>> {
    let mut parts = dirs
        .iter()
        .map(|d| Checkpoint::open(d))
        .collect::<Result<Vec<_>>>()?;
    parts.sort_by_key(|p| p.state.start);
    let Some(first) = parts.first() else {
        bail!("no parts to merge");
    };
    let (fp, blocks) = (first.state.fingerprint.clone(), first.state.blocks);
    let mut next = 0;
    for p in &parts {
        let s = &p.state;
        if s.fingerprint != fp {
            bail!(
                "{} is a part of another run than {}",
                p.dir.display(),
                first.dir.display()
            );
        }
        if !s.complete() {
            bail!(
                "{} is unfinished (blocks {}..{}, {} done): resume it first",
                p.dir.display(),
                s.start,
                s.end,
                s.done
            );
        }
        if s.start != next {
            bail!(
                "the parts do not cover blocks {next}..{} (the next part starts at block {})",
                s.start.max(next),
                s.start
            );
        }
        next = s.end;
    }
    if next != blocks {
        bail!("the parts end at block {next}; the model has {blocks}");
    }
    Ok(parts)
}

/// Parses a block range `A..B` (half-open).
pub fn parse_range(s: &str) -> Result<Range<usize>> {
    let bad =
        || format!("block range '{s}': write A..B, e.g. 0..15 (block A up to, not including, B)");
    let (a, b) = s.split_once("..").with_context(bad)?;
    let a: usize = a.trim().parse().ok().with_context(bad)?;
    let b: usize = b.trim().parse().ok().with_context(bad)?;
    if a >= b {
        bail!("block range '{s}' is empty");
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_half_open() {
        assert_eq!(parse_range("0..15").unwrap(), 0..15);
        assert_eq!(parse_range(" 3 .. 4").unwrap(), 3..4);
        for bad in ["3..3", "4..2", "1-2", "a..b", ".."] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn activations_read_back_and_damage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let xs = vec![
            Tensor::from_vec(
                (0..12).map(|i| i as f32 * 0.5).collect::<Vec<_>>(),
                (3, 4),
                &Device::Cpu,
            )
            .unwrap(),
            Tensor::from_vec(vec![f32::NAN, -1.0], (1, 2), &Device::Cpu).unwrap(),
        ];
        let h = write_acts(d.path(), 7, &xs).unwrap();
        let p = d.path().join(acts_file(7));
        let back = match read_acts(&p, 7, &h, None).unwrap() {
            Acts::Held(v) => v,
            Acts::Spilled(_) => panic!("no limit given, nothing spills"),
        };
        assert_eq!(back.len(), 2);
        for (a, b) in xs.iter().zip(&back) {
            assert_eq!(a.dims(), b.dims());
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        assert!(
            read_acts(&p, 6, &h, None).is_err(),
            "another block's inputs"
        );
        assert!(
            read_acts(&p, 7, &"0".repeat(64), None).is_err(),
            "another hash"
        );
        let bytes = std::fs::read(&p).unwrap();
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&p, &flipped).unwrap();
        assert!(read_acts(&p, 7, &h, None).is_err(), "a flipped bit");
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        assert!(read_acts(&p, 7, &h, None).is_err(), "cut short");
        let mut huge = bytes.clone();
        // The first tensor's row count, after magic, block, count and its rank.
        huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &huge).unwrap();
        assert!(
            read_acts(&p, 7, &h, None).is_err(),
            "a size beyond the file"
        );
    }

    fn one_layer(name: &str, seed: f32) -> Calibration {
        let w: Vec<f32> = (0..64).map(|i| (i as f32 * seed).sin()).collect();
        let cfg = adaptq_quant::RtnConfig {
            bits: 4,
            group_size: 16,
            grid: adaptq_quant::Grid::Symmetric,
        };
        let q = adaptq_quant::rtn::quantize_rtn(&w, 4, 16, &cfg).unwrap();
        let mut cal = Calibration::default();
        cal.layers.insert(
            name.into(),
            CalibratedLayer {
                q: adaptq_quant::LayerCodes::Int(q),
                method: "gptq",
                col_scale: None,
                row_scale: None,
                output_rel_error: seed as f64,
                rtn_output_rel_error: 1.0,
                scaled_weight: None,
                refit_error_reduction: None,
                novaq: None,
                reference_weight: Some(w),
            },
        );
        cal
    }

    /// A saved block's codes leave memory, are read back bit for bit from its file (also by a
    /// resumed run), and a damaged file is refused when read back.
    #[test]
    fn saved_blocks_release_their_codes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cp");
        let state = State {
            format: FORMAT.into(),
            fingerprint: "f".into(),
            options: QuantizeOptions::default(),
            locator: "m".into(),
            calib: CalibInfo {
                config: adaptq_bundle::verification::CalibConfig {
                    file: "t.txt".into(),
                    samples: 1,
                    seq_len: 4,
                    seed: 0,
                },
                text_tokens: 4,
                fingerprint: "0".into(),
            },
            blocks: 2,
            start: 0,
            end: 2,
            done: 0,
            tail_done: false,
            hashes: Default::default(),
        };
        let mut cp = Checkpoint::create(&dir, state).unwrap();
        let xs = vec![Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap()];
        let names = ["blk.0.attn_q.weight", "blk.1.attn_q.weight"];
        let mut out = Calibration::default();
        for (b, name) in names.iter().enumerate() {
            let part = one_layer(name, 0.5 + b as f32);
            let want = part.layers[*name].q.clone();
            let saved = cp.save_block(b, part, &xs).unwrap();
            assert!(saved.layers.is_empty(), "codes still held");
            let (file, summary) = &saved.saved[*name];
            assert_eq!(summary.output_rel_error, 0.5 + b as f64);
            assert_eq!(file.read().unwrap().layers[*name].q, want);
            out.absorb(saved);
        }
        assert_eq!(out.saved.len(), 2);
        assert_eq!(out.summary(names[1]).unwrap().method, "gptq");
        drop(cp);
        let back = Checkpoint::open(&dir).unwrap().calibration().unwrap();
        assert!(back.layers.is_empty());
        let files: Vec<_> = back.saved.values().map(|(f, _)| f.clone()).collect();
        assert_eq!(
            files,
            out.saved
                .values()
                .map(|(f, _)| f.clone())
                .collect::<Vec<_>>()
        );
        let path = &files[1].path;
        let mut bytes = std::fs::read(path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(path, &bytes).unwrap();
        let e = format!("{:#}", files[1].read().err().unwrap());
        assert!(e.contains("damaged"), "{e}");
        assert!(files[0].read().is_ok());
    }

    #[test]
    fn records_keep_every_field() {
        let q = adaptq_quant::rtn::quantize_rtn(
            &(0..64).map(|i| (i as f32).sin()).collect::<Vec<_>>(),
            4,
            16,
            &adaptq_quant::RtnConfig {
                bits: 3,
                group_size: 8,
                grid: adaptq_quant::Grid::Asymmetric,
            },
        )
        .unwrap();
        let mut cal = Calibration::default();
        cal.layers.insert(
            "blk.0.attn_q.weight".into(),
            CalibratedLayer {
                q: adaptq_quant::LayerCodes::Int(q),
                method: "awq+gptq",
                col_scale: Some(vec![1.5; 16]),
                row_scale: None,
                output_rel_error: 0.25,
                rtn_output_rel_error: f64::NAN,
                scaled_weight: None,
                refit_error_reduction: Some(0.1),
                novaq: None,
                reference_weight: Some(vec![2.0; 64]),
            },
        );
        cal.overrides
            .insert("blk.0.attn_norm.weight".into(), vec![0.5; 16]);
        let bytes = postcard::to_stdvec(&Record::of(&cal).unwrap()).unwrap();
        let back: Record = postcard::from_bytes(&bytes).unwrap();
        let back = back.into_calibration().unwrap();
        let (a, b) = (
            &cal.layers["blk.0.attn_q.weight"],
            &back.layers["blk.0.attn_q.weight"],
        );
        assert_eq!(a.q, b.q);
        assert_eq!(a.method, b.method);
        assert_eq!(a.col_scale, b.col_scale);
        assert_eq!(a.reference_weight, b.reference_weight);
        assert_eq!(a.refit_error_reduction, b.refit_error_reduction);
        assert!(b.rtn_output_rel_error.is_nan());
        assert_eq!(cal.overrides, back.overrides);
        assert!(postcard::from_bytes::<Record>(&bytes[..bytes.len() / 2]).is_err());
        let mut bad: Record = postcard::from_bytes(&bytes).unwrap();
        if let adaptq_quant::LayerCodes::Int(t) = &mut bad.layers[0].1.q {
            t.scales.pop();
        }
        let e = format!("{:#}", bad.into_calibration().err().unwrap());
        assert!(e.contains("do not fit"), "{e}");
    }

    #[test]
    fn removal_leaves_folders_that_are_not_all_ours() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cp");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(STATE), format!("{{\"format\": \"{FORMAT}\"}}")).unwrap();
        std::fs::write(dir.join(block_file(0)), b"x").unwrap();
        std::fs::create_dir(dir.join("notes.tmp")).unwrap();
        assert!(Checkpoint::remove(&dir).is_err(), "a folder inside");
        assert!(dir.join(STATE).exists() && dir.join(block_file(0)).exists());
        std::fs::remove_dir(dir.join("notes.tmp")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        assert!(Checkpoint::remove(&dir).is_err(), "a file of the user's");
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        Checkpoint::remove(&dir).unwrap();
        assert!(!dir.exists());
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(STATE), b"{\"format\": \"something else\"}").unwrap();
        assert!(Checkpoint::remove(&dir).is_err(), "another format");
    }
}
