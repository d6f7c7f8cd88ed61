//! Teacher-guided refinement: with every code fixed (the bit budget does not move), the
//! quantized model's continuous parameters are trained by backpropagation (candle's autograd
//! through the model's exact forward pass) against the unquantized model: integer-grid group
//! scales and mins, NOVAQ codebooks and row/column scales and means, GGML blocks' sub-block
//! scales and mins, the norms, and end to end the embedding's and an untied head's too.
//!
//! - **Block-wise**: block by block, the student block on the quantized model's own inputs is
//!   fitted to the teacher block's output on the teacher's own inputs (relative squared error
//!   plus a weighted cosine distance), so each block also makes up for what the blocks before
//!   it lost, as OmniQuant and EfficientQAT's block phase do. Gradients need one block.
//! - **End to end**: KL(teacher ‖ student) of the next-token distributions, the teacher's
//!   computed once and kept as its top-k tokens plus the tail mass (memory bounded by k), plus
//!   the weighted cosine distance of the last hidden states.
//!
//! The calibration windows are split: the last eighth (at least one) is held out and never
//! trained on; each phase (each block, then the whole model) keeps the parameters of its best
//! held-out loss and stops at the first epoch that raises it. What the bundle can store (f16
//! values; for GGML k-quants integer sub-scales of one f16 step) is then put into the student
//! and judged on the held-out windows again: it is written only when it still beats what the
//! phase started from. Scales are trained as `s₀·(1 + δ)` and mins as `m₀ + |s₀|·δ'`, so one
//! step size suits every layer. Rotated models run their online rotations as dense products
//! while training.
//!
//! Both models are held in f32: memory is about twice the f32 model's plus, end to end, the
//! autograd graph of one window (SmolLM2-135M, RTN 4-bit, 16 windows of 256 tokens: 6761 MiB
//! peak RSS in scripts/bench-refine.sh).

use crate::calibrate::{CalibratedLayer, Calibration};
use crate::options::RefineMode;
use crate::quantize::QuantizeConfig;
use adaptq_model::llama::Llama;
use adaptq_quant::{Grid, LayerCodes, QuantizedTensor};
use adaptq_source::model::role_of;
use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use half::f16;
use serde_json::json;
use std::collections::BTreeMap;

/// What a refinement run does; recorded in the manifest through the quantize options.
#[derive(Debug, Clone)]
pub struct RefineSettings {
    pub mode: RefineMode,
    pub epochs: usize,
    /// Adam's starting step: block-wise, and end to end unless `e2e_lr` says otherwise.
    pub lr: f64,
    /// The end-to-end phase's starting step.
    pub e2e_lr: Option<f64>,
    pub cosine_weight: f64,
    /// Orders the training windows of each epoch.
    pub seed: u64,
    /// Teacher tokens kept per position for the end-to-end KL.
    pub top_k: usize,
}

/// Teacher tokens kept per position: SmolLM2's top 64 hold all but ~1e-3 of the mass on
/// most positions; the rest is kept as one tail bucket.
pub const TOP_K: usize = 64;

/// An integer-grid layer, or GGML blocks, as trainable parameters: `w = c · s₀(1 + a)
/// [+ m₀ + |s₀| b]` per group (a GGML sub-block), `c` the fixed code as the grid reads it
/// (less the zero code on a symmetric grid; an IQ4 table level).
struct GridParam {
    name: String,
    codes: Tensor,
    /// Group of each column, `[cols]`.
    gidx: Tensor,
    s0: Tensor,
    /// `(m₀, |s₀|)` on an asymmetric grid.
    m0: Option<(Tensor, Tensor)>,
    a: Var,
    b: Option<Var>,
    /// GGML blocks: their type and codes, written again around the trained scales.
    ggml: Option<(adaptq_quant::ggml::BlockType, Vec<u8>)>,
}

fn cpu() -> Device {
    Device::Cpu
}

impl GridParam {
    fn new(name: &str, q: &QuantizedTensor) -> Result<GridParam> {
        let (rows, cols, gpr) = (q.rows, q.cols, q.groups_per_row());
        let codes = adaptq_quant::pack::unpack(&q.codes, q.bits, rows * cols);
        let zero = match q.grid {
            Grid::Symmetric => (1u32 << (q.bits - 1)) as f32,
            Grid::Asymmetric => 0.0,
        };
        let codes: Vec<f32> = codes.iter().map(|&c| c as f32 - zero).collect();
        let gidx: Vec<u32> = (0..cols).map(|c| (c / q.group_size) as u32).collect();
        let s: Vec<f32> = q.scales.iter().map(|v| v.to_f32()).collect();
        let s0 = Tensor::from_vec(s, (rows, gpr), &cpu())?;
        let m0 = match q.grid {
            Grid::Asymmetric => {
                let m: Vec<f32> = q.mins.iter().map(|v| v.to_f32()).collect();
                Some((Tensor::from_vec(m, (rows, gpr), &cpu())?, s0.abs()?))
            }
            Grid::Symmetric => None,
        };
        let zeros = || Var::zeros((rows, gpr), DType::F32, &cpu());
        Ok(GridParam {
            name: name.to_string(),
            codes: Tensor::from_vec(codes, (rows, cols), &cpu())?,
            gidx: Tensor::from_vec(gidx, cols, &cpu())?,
            b: m0.as_ref().map(|_| zeros()).transpose()?,
            a: zeros()?,
            s0,
            m0,
            ggml: None,
        })
    }

    fn from_ggml(
        name: &str,
        ty: adaptq_quant::ggml::BlockType,
        (rows, cols): (usize, usize),
        bytes: &[u8],
    ) -> Result<GridParam> {
        use adaptq_quant::ggml::BlockType as T;
        let f = adaptq_quant::ggml::sub_affine(ty, bytes, rows * cols)
            .with_context(|| format!("decoding '{name}'"))?;
        let sl = ty.sub_len();
        if !cols.is_multiple_of(sl) {
            bail!(
                "'{name}': {cols} columns are not whole {} sub-blocks",
                ty.name()
            );
        }
        let gpr = cols / sl;
        let gidx: Vec<u32> = (0..cols).map(|c| (c / sl) as u32).collect();
        let s0 = Tensor::from_vec(f.a, (rows, gpr), &cpu())?;
        let has_min = matches!(ty, T::Q4_1 | T::Q5_1 | T::Q2K | T::Q4K | T::Q5K);
        let m0 = match has_min {
            true => Some((Tensor::from_vec(f.b, (rows, gpr), &cpu())?, s0.abs()?)),
            false => None,
        };
        let zeros = || Var::zeros((rows, gpr), DType::F32, &cpu());
        Ok(GridParam {
            name: name.to_string(),
            codes: Tensor::from_vec(f.levels, (rows, cols), &cpu())?,
            gidx: Tensor::from_vec(gidx, cols, &cpu())?,
            b: m0.as_ref().map(|_| zeros()).transpose()?,
            a: zeros()?,
            s0,
            m0,
            ggml: Some((ty, f.codes)),
        })
    }

    /// GGML blocks around the trained scales, and the relative squared error that writing
    /// them onto the type's scale fields costs (k-quants: integer sub-scales of one f16 step).
    fn ggml_blocks(&self) -> Result<Option<(Vec<u8>, f64)>> {
        let Some((ty, codes)) = &self.ggml else {
            return Ok(None);
        };
        let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.detach().flatten_all()?.to_vec1()?) };
        let a = flat(self.scales()?)?;
        let b = match self.mins()? {
            Some(m) => flat(m)?,
            None => vec![0.0; a.len()],
        };
        let bytes = adaptq_quant::ggml::encode_affine(*ty, codes, &a, &b)?;
        let want = flat(self.weight()?)?;
        let got = adaptq_quant::ggml::dequantize(*ty, &bytes, want.len())?;
        let (num, den) = want.iter().zip(&got).fold((0f64, 0f64), |(n, d), (w, g)| {
            (n + ((w - g) as f64).powi(2), d + (*w as f64).powi(2))
        });
        if got.iter().any(|v| !v.is_finite()) {
            bail!("refinement left a non-finite value in '{}'", self.name);
        }
        Ok(Some((bytes, num / den.max(f64::MIN_POSITIVE))))
    }

    fn scales(&self) -> Result<Tensor> {
        Ok(self.s0.mul(&(self.a.as_tensor() + 1.0)?)?)
    }

    fn mins(&self) -> Result<Option<Tensor>> {
        Ok(match (&self.m0, &self.b) {
            (Some((m0, s_abs)), Some(b)) => Some((m0 + s_abs.mul(b.as_tensor())?)?),
            _ => None,
        })
    }

    /// The layer's weight `[rows, cols]`, a function of the parameters.
    fn weight(&self) -> Result<Tensor> {
        let s = self.scales()?.index_select(&self.gidx, 1)?;
        let w = self.codes.mul(&s)?;
        Ok(match self.mins()? {
            Some(m) => (w + m.index_select(&self.gidx, 1)?)?,
            None => w,
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.a.clone()];
        v.extend(self.b.clone());
        v
    }

    /// Writes the trained scales (and mins) into `q` as its f16 values.
    fn store(&self, q: &mut QuantizedTensor) -> Result<()> {
        let to16 = |t: Tensor| -> Result<Vec<f16>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f16::from_f32)
                .collect())
        };
        let s = to16(self.scales()?.detach())?;
        if s.iter().any(|v| !v.is_finite()) {
            bail!("refinement left a non-finite scale in '{}'", self.name);
        }
        q.scales = s;
        if let Some(m) = self.mins()? {
            q.mins = to16(m.detach())?;
        }
        Ok(())
    }
}

/// A NOVAQ layer as trainable parameters: `w[r, c] = m_r + s_r · t_c · Σ_stages B[code]`,
/// every codebook `B₀ + Δ` (centroids are in normalized units), row and column scales
/// relative, row means in units of their row's scale.
struct BookParam {
    name: String,
    rows: usize,
    cols: usize,
    /// Per stage: codes `[rows · vectors]` and the centroids `[k, dim]` before training.
    stages: Vec<(Tensor, Tensor, Var)>,
    rs0: Tensor,
    rm0: Tensor,
    cs0: Tensor,
    rs: Var,
    rm: Var,
    cs: Var,
}

impl BookParam {
    fn new(name: &str, t: &adaptq_quant::novaq::CodebookTensor) -> Result<BookParam> {
        let (rows, cols, dim) = (t.rows, t.cols, t.dim);
        let nv = cols.div_ceil(dim);
        let vec16 = |v: &[f16], shape: (usize, usize)| -> Result<Tensor> {
            let x: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
            Ok(Tensor::from_vec(x, shape, &cpu())?)
        };
        let stages = t
            .stages
            .iter()
            .map(|st| {
                let k = 1usize << st.bits;
                let codes: Vec<u32> = adaptq_quant::pack::unpack(&st.codes, st.bits, rows * nv)
                    .into_iter()
                    .map(u32::from)
                    .collect();
                Ok((
                    Tensor::from_vec(codes, rows * nv, &cpu())?,
                    vec16(&st.centroids, (k, dim))?,
                    Var::zeros((k, dim), DType::F32, &cpu())?,
                ))
            })
            .collect::<Result<_>>()?;
        let zeros = |shape: (usize, usize)| Var::zeros(shape, DType::F32, &cpu());
        Ok(BookParam {
            name: name.to_string(),
            rows,
            cols,
            stages,
            rs0: vec16(&t.row_scale, (rows, 1))?,
            rm0: vec16(&t.row_mean, (rows, 1))?,
            cs0: vec16(&t.col_scale, (1, cols))?,
            rs: zeros((rows, 1))?,
            rm: zeros((rows, 1))?,
            cs: zeros((1, cols))?,
        })
    }

    fn parts(&self) -> Result<(Vec<Tensor>, Tensor, Tensor, Tensor)> {
        let books = self
            .stages
            .iter()
            .map(|(_, b0, d)| Ok((b0 + d.as_tensor())?))
            .collect::<Result<_>>()?;
        let rs = self.rs0.mul(&(self.rs.as_tensor() + 1.0)?)?;
        let rm = (&self.rm0 + self.rs0.abs()?.mul(self.rm.as_tensor())?)?;
        let cs = self.cs0.mul(&(self.cs.as_tensor() + 1.0)?)?;
        Ok((books, rs, rm, cs))
    }

    fn weight(&self) -> Result<Tensor> {
        let (books, rs, rm, cs) = self.parts()?;
        let mut acc: Option<Tensor> = None;
        for ((codes, _, _), b) in self.stages.iter().zip(&books) {
            let v = b.index_select(codes, 0)?;
            acc = Some(match acc {
                Some(a) => (a + v)?,
                None => v,
            });
        }
        let acc = acc.context("a codebook layer without stages")?;
        let acc = acc.reshape((self.rows, ()))?.narrow(1, 0, self.cols)?;
        Ok(acc
            .broadcast_mul(&cs)?
            .broadcast_mul(&rs)?
            .broadcast_add(&rm)?)
    }

    fn vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.stages.iter().map(|(_, _, d)| d.clone()).collect();
        v.extend([self.rs.clone(), self.rm.clone(), self.cs.clone()]);
        v
    }

    fn store(&self, t: &mut adaptq_quant::novaq::CodebookTensor) -> Result<()> {
        let (books, rs, rm, cs) = self.parts()?;
        let to16 = |x: &Tensor| -> Result<Vec<f16>> {
            let v: Vec<f16> = x
                .detach()
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f16::from_f32)
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                bail!("refinement left a non-finite value in '{}'", self.name);
            }
            Ok(v)
        };
        for (st, b) in t.stages.iter_mut().zip(&books) {
            st.centroids = to16(b)?;
        }
        t.row_scale = to16(&rs)?;
        t.row_mean = to16(&rm)?;
        t.col_scale = to16(&cs)?;
        Ok(())
    }
}

/// A layer's trainable form, by how its codes decode.
enum Param {
    Grid(GridParam),
    Book(BookParam),
}

impl Param {
    /// The trainable form of `q`.
    fn of(name: &str, q: &LayerCodes) -> Result<Param> {
        Ok(match q {
            LayerCodes::Int(t) => Param::Grid(GridParam::new(name, t)?),
            LayerCodes::Codebook(t) => Param::Book(BookParam::new(name, t)?),
            LayerCodes::Ggml {
                ty,
                rows,
                cols,
                bytes,
            } => Param::Grid(GridParam::from_ggml(name, *ty, (*rows, *cols), bytes)?),
        })
    }
    fn name(&self) -> &str {
        match self {
            Param::Grid(g) => &g.name,
            Param::Book(b) => &b.name,
        }
    }
    fn weight(&self) -> Result<Tensor> {
        match self {
            Param::Grid(g) => g.weight(),
            Param::Book(b) => b.weight(),
        }
    }
    fn vars(&self) -> Vec<Var> {
        match self {
            Param::Grid(g) => g.vars(),
            Param::Book(b) => b.vars(),
        }
    }
    /// `q` with the trained values in place of its continuous parameters, and for GGML
    /// blocks the relative error of writing them onto the type's scale fields.
    fn stored(&self, q: &LayerCodes) -> Result<(LayerCodes, Option<f64>)> {
        let mut q = q.clone();
        let mut cost = None;
        match (self, &mut q) {
            (Param::Grid(g), LayerCodes::Int(t)) => g.store(t)?,
            (Param::Book(b), LayerCodes::Codebook(t)) => b.store(t)?,
            (Param::Grid(g), LayerCodes::Ggml { bytes, .. }) => {
                let (b, e) = g.ggml_blocks()?.context("blocks without their type")?;
                *bytes = b;
                cost = Some(e);
            }
            _ => bail!("'{}' changed kind during refinement", self.name()),
        }
        Ok((q, cost))
    }
}

/// A norm weight as `w₀(1 + c)`.
struct NormParam {
    base: Tensor,
    c: Var,
}

impl NormParam {
    fn new(base: &Tensor) -> Result<NormParam> {
        Ok(NormParam {
            base: base.detach(),
            c: Var::zeros(base.dims(), DType::F32, &cpu())?,
        })
    }
    fn value(&self) -> Result<Tensor> {
        Ok(self.base.mul(&(self.c.as_tensor() + 1.0)?)?)
    }
}

/// Adam on the parameters' relative changes, its step size decayed from `lr` to zero over the
/// phase's planned steps on a half cosine, so late steps settle instead of overshooting.
/// Hand-written: candle-core has autograd but no optimizers (candle-nn would be a second
/// tensor crate for twenty lines).
struct Adam {
    lr: f64,
    t: i32,
    steps: usize,
    state: Vec<(Var, Tensor, Tensor)>,
}

impl Adam {
    fn new(vars: Vec<Var>, lr: f64, steps: usize) -> Result<Adam> {
        let state = vars
            .into_iter()
            .map(|v| {
                let z = v.as_tensor().zeros_like()?;
                Ok((v, z.clone(), z))
            })
            .collect::<Result<_>>()?;
        Ok(Adam {
            lr,
            t: 0,
            steps,
            state,
        })
    }

    /// The step size of step `t` (from 1): `lr · (1 + cos(π (t-1) / steps)) / 2`.
    fn rate(&self) -> f64 {
        let x = (self.t - 1) as f64 / self.steps.max(1) as f64;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * x.min(1.0)).cos())
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let lr = self.rate();
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (v, m, s) in &mut self.state {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            *m = (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            *s = (s.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let step = m
                .affine(1.0 / c1, 0.0)?
                .div(&(s.affine(1.0 / c2, 0.0)?.sqrt()? + eps)?)?;
            v.set(&(v.as_tensor().detach() - step.affine(lr, 0.0)?)?)?;
        }
        Ok(())
    }
}

/// A phase's best held-out loss so far, its epoch, and the variables' values then.
struct Best {
    loss: f64,
    epoch: usize,
    values: Vec<Tensor>,
}

impl Best {
    /// The phase's starting point (epoch 0).
    fn start(loss: f64, vars: &[Var]) -> Result<Best> {
        Ok(Best {
            loss,
            epoch: 0,
            values: Self::values(vars)?,
        })
    }

    fn values(vars: &[Var]) -> Result<Vec<Tensor>> {
        vars.iter()
            .map(|v| Ok(v.as_tensor().detach().copy()?))
            .collect()
    }

    /// Records `epoch`'s held-out loss; false when it is not lower (the phase stops; a NaN
    /// never counts as lower).
    fn offer(&mut self, loss: f64, epoch: usize, vars: &[Var]) -> Result<bool> {
        if loss.partial_cmp(&self.loss) != Some(std::cmp::Ordering::Less) {
            return Ok(false);
        }
        self.values = Self::values(vars)?;
        (self.loss, self.epoch) = (loss, epoch);
        Ok(true)
    }

    /// Puts the best epoch's values back.
    fn restore(&self, vars: &[Var]) -> Result<()> {
        for (v, x) in vars.iter().zip(&self.values) {
            v.set(x)?;
        }
        Ok(())
    }
}

/// Mean over rows of `1 - cos(y_row, t_row)`.
fn cosine_distance(y: &Tensor, t: &Tensor) -> Result<Tensor> {
    let dot = y.mul(t)?.sum_keepdim(D::Minus1)?;
    // The small terms keep the gradient of sqrt finite on an all-zero row.
    let ny = (y.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    let nt = (t.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    let cos = dot.div(&ny.mul(&nt)?)?;
    Ok((cos.mean_all()?.neg()? + 1.0)?)
}

/// Block loss: squared error relative to the teacher output's energy, plus the cosine term.
fn block_loss(y: &Tensor, t: &Tensor, cw: f64) -> Result<Tensor> {
    let energy = t.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    let mse = ((y - t)?.sqr()?.mean_all()? / energy.max(1e-30))?;
    Ok((mse + (cosine_distance(y, t)? * cw)?)?)
}

/// The teacher's next-token distribution at each position of a window: its top-k tokens and
/// their log-probabilities, and the tail's mass.
struct TeacherLogits {
    idx: Tensor,
    logp: Tensor,
    tail_p: Tensor,
    tail_logp: Tensor,
    hidden: Tensor,
}

fn teacher_logits(teacher: &Llama, tokens: &[u32], k: usize) -> Result<TeacherLogits> {
    let hidden = teacher.hidden(tokens, None, None)?;
    let logits = teacher.head(&hidden)?;
    top_k(&logits, hidden.detach(), k)
}

/// The distribution of each row of `logits: [T, vocab]` as its `k` likeliest tokens and the
/// tail's mass, with `hidden` (the states the logits came from).
fn top_k(logits: &Tensor, hidden: Tensor, k: usize) -> Result<TeacherLogits> {
    let (t, vocab) = logits.dims2()?;
    let k = k.clamp(1, vocab);
    let rows = logits.to_vec2::<f32>()?;
    let (mut idx, mut logp, mut tail_p) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max as f64
            + row
                .iter()
                .map(|&x| ((x - max) as f64).exp())
                .sum::<f64>()
                .ln();
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        // Ties broken by token id: the same tokens on every machine.
        order
            .sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let mut kept = 0f64;
        for &i in &order[..k] {
            let lp = row[i as usize] as f64 - lse;
            kept += lp.exp();
            idx.push(i);
            logp.push(lp as f32);
        }
        tail_p.push((1.0 - kept).max(1e-12) as f32);
    }
    let tail_logp: Vec<f32> = tail_p.iter().map(|p| p.ln()).collect();
    Ok(TeacherLogits {
        idx: Tensor::from_vec(idx, (t, k), &cpu())?,
        logp: Tensor::from_vec(logp, (t, k), &cpu())?,
        tail_p: Tensor::from_vec(tail_p, (t, 1), &cpu())?,
        tail_logp: Tensor::from_vec(tail_logp, (t, 1), &cpu())?,
        hidden,
    })
}

/// Mean over positions of KL(teacher ‖ student) on the teacher's top-k tokens and the tail.
fn kl_loss(logits: &Tensor, te: &TeacherLogits) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let lq = logits.broadcast_sub(&lse)?;
    let lq_top = lq.gather(&te.idx, 1)?;
    let p = te.logp.exp()?;
    let head = p.mul(&(&te.logp - &lq_top)?)?.sum_keepdim(D::Minus1)?;
    let q_tail = (lq_top.exp()?.sum_keepdim(D::Minus1)?.neg()? + 1.0)?.clamp(1e-12, 1.0)?;
    let tail = te.tail_p.mul(&(&te.tail_logp - q_tail.log()?)?)?;
    Ok((head + tail)?.mean_all()?)
}

/// The trainable parameters of block `i` of `student`.
struct BlockParams {
    grids: Vec<Param>,
    norms: (NormParam, NormParam),
}

impl BlockParams {
    fn new(student: &Llama, i: usize, cal: &Calibration) -> Result<BlockParams> {
        let b = &student.blocks[i];
        let mut grids = Vec::new();
        for l in b.linears() {
            if let Some(c) = cal.layers.get(&l.name) {
                grids.push(Param::of(&l.name, &c.q)?);
            }
        }
        let (a, f) = b.norms();
        Ok(BlockParams {
            grids,
            norms: (NormParam::new(a)?, NormParam::new(f)?),
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.grids.iter().flat_map(Param::vars).collect();
        v.push(self.norms.0.c.clone());
        v.push(self.norms.1.c.clone());
        v
    }

    /// Puts the parameters into the student's block `i`: as functions of the variables when
    /// `track`, as plain values otherwise.
    fn install(&self, student: &mut Llama, i: usize, track: bool) -> Result<()> {
        let fix = |t: Tensor| -> Result<Tensor> {
            Ok(match track {
                true => t,
                false => t.detach().copy()?,
            })
        };
        let b = &mut student.blocks[i];
        for l in b.linears_mut() {
            if let Some(g) = self.grids.iter().find(|g| g.name() == l.name) {
                l.set_tensor(fix(g.weight()?)?)?;
            }
        }
        b.set_norms(fix(self.norms.0.value()?)?, fix(self.norms.1.value()?)?)
    }
}

/// The quantized model as the bundle will store it, in f32 on the exact path: the source with
/// every calibrated layer's codes dequantized and the norm overrides in place.
fn student_model(
    desc: &adaptq_source::ModelDesc,
    w: &dyn adaptq_model::Weights,
    cal: &Calibration,
    f16_tables: bool,
    rotate: Option<u64>,
) -> Result<Llama> {
    let mut m = Llama::load(desc, w)?;
    // The codes of a rotated model hold W·R; its forward pass rotates the inputs online.
    if let Some(seed) = rotate {
        m.rotate(seed)?;
        m.set_differentiable(true)?;
    }
    // An embedding (and separate head) kept as float is stored in f16.
    let f16 =
        |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect() };
    if f16_tables && !cal.layers.contains_key(&m.embed_name) {
        let e = m.embedding_rows()?;
        m.set_embedding(f16(e))?;
    }
    let head = m.head_name.clone();
    if f16_tables && !cal.layers.contains_key(&head) {
        if let Some(h) = m.head_mut() {
            let (v, _, _) = h.weight_rows()?;
            h.set_weight(f16(v))?;
        }
    }
    let mut used = 0usize;
    for b in m.blocks.iter_mut() {
        for l in b.linears_mut() {
            if let Some(c) = cal.layers.get(&l.name) {
                l.set_weight(c.q.dequantize())?;
                used += 1;
            }
        }
        let off = b.norm_offset() as f64;
        let norm = |name: &str, t: &Tensor| -> Result<Tensor> {
            Ok(match cal.overrides.get(name) {
                Some(v) => (Tensor::from_vec(v.clone(), v.len(), &cpu())? + off)?,
                None => t.clone(),
            })
        };
        let (a, f) = b.norms();
        let (a, f) = (norm(&b.attn_norm_name, a)?, norm(&b.ffn_norm_name, f)?);
        b.set_norms(a, f)?;
    }
    if let Some(c) = cal.layers.get(&m.embed_name) {
        m.set_embedding(c.q.dequantize())?;
        used += 1;
    }
    if let (Some(c), Some(h)) = (cal.layers.get(&head), m.head_mut()) {
        h.set_weight(c.q.dequantize())?;
        used += 1;
    }
    if used != cal.layers.len() {
        bail!(
            "refinement found {used} of the {} quantized layers in the model",
            cal.layers.len()
        );
    }
    let known = |n: &String| {
        m.blocks
            .iter()
            .any(|b| &b.attn_norm_name == n || &b.ffn_norm_name == n)
    };
    if let Some(n) = cal.overrides.keys().find(|n| !known(n)) {
        bail!("refinement does not handle the replaced tensor '{n}'");
    }
    Ok(m)
}

/// Sets the student's layer `name` (a block's, the embedding, an untied head) to the values
/// `q` decodes to: what the bundle will hold.
fn put_stored(m: &mut Llama, name: &str, q: &LayerCodes) -> Result<()> {
    let w = q.dequantize();
    if name == m.embed_name {
        return m.set_embedding(w);
    }
    if m.head_mut().is_some_and(|h| h.name == name) {
        return m.head_mut().context("an untied head")?.set_weight(w);
    }
    for b in m.blocks.iter_mut() {
        for l in b.linears_mut() {
            if l.name == name {
                return l.set_weight(w);
            }
        }
    }
    bail!("the model has no layer '{name}'")
}

/// Brings every layer into `cal.layers`: codes a checkpoint saved are read back, and tensors
/// no calibration stage rounded (the embedding with `embeddings: quant`, say) are rounded as
/// the bundle writer would round them.
fn gather_layers(
    src: &dyn adaptq_source::TensorSource,
    cfg: &QuantizeConfig,
    cal: &mut Calibration,
) -> Result<()> {
    let saved = std::mem::take(&mut cal.saved);
    let mut files: Vec<&crate::checkpoint::SavedFile> = Vec::new();
    for (f, _) in saved.values() {
        if !files.contains(&f) {
            files.push(f);
        }
    }
    for f in files {
        let mut c = f.read()?;
        for (name, (file, _)) in &saved {
            if file == f && !cal.layers.contains_key(name) {
                let layer = c
                    .layers
                    .remove(name)
                    .with_context(|| format!("{} holds no codes for '{name}'", f.path.display()))?;
                cal.layers.insert(name.clone(), layer);
            }
        }
    }
    for info in src.tensors() {
        let role = role_of(info);
        if !info.dtype.is_float()
            || !crate::quantize::is_quantized(info, role, cfg)
            || cal.layers.contains_key(&info.name)
        {
            continue;
        }
        let x = src.read_f32(&info.name)?;
        let (q, method) = crate::quantize::direct_codes(&x, info, role, cfg)?;
        cal.layers.insert(
            info.name.clone(),
            CalibratedLayer {
                q,
                method,
                col_scale: None,
                row_scale: None,
                output_rel_error: f64::NAN,
                rtn_output_rel_error: f64::NAN,
                scaled_weight: None,
                refit_error_reduction: None,
                novaq: None,
                reference_weight: None,
            },
        );
    }
    Ok(())
}

/// Progress: (phase, done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Refines the codes' continuous parameters in `cal` against the unquantized model on
/// `windows` (calibration windows; the last eighth held out). Returns the verification
/// section: every loss per epoch, held-out included.
pub fn run(
    src: &dyn adaptq_source::TensorSource,
    cfg: &QuantizeConfig,
    cal: &mut Calibration,
    windows: &[Vec<u32>],
    s: &RefineSettings,
    progress: Progress,
) -> Result<serde_json::Value> {
    if s.mode == RefineMode::Off {
        bail!("refinement is off");
    }
    if windows.len() < 2 {
        bail!("refinement needs at least 2 calibration windows (one is held out)");
    }
    let step_ok = |lr: f64| lr.is_finite() && lr > 0.0;
    if !(step_ok(s.lr)
        && s.e2e_lr.is_none_or(step_ok)
        && s.cosine_weight.is_finite()
        && s.cosine_weight >= 0.0)
    {
        bail!("refinement needs a positive step size and a non-negative cosine weight");
    }
    let w = adaptq_model::borrowed_source(src);
    let desc = w.desc().clone();
    if desc.decoder.moe.is_some() {
        bail!("refinement of mixture-of-experts models is not built");
    }
    gather_layers(src, cfg, cal)?;
    let held = (windows.len() / 8).max(1);
    let (train, heldout) = windows.split_at(windows.len() - held);
    let teacher = Llama::load(&desc, w.as_ref()).context("loading the teacher")?;
    let f16_tables = cfg.embeddings == crate::options::EmbeddingMode::F16;
    let mut student = student_model(
        &desc,
        w.as_ref(),
        cal,
        f16_tables,
        cfg.rotate.as_ref().map(|r| r.seed),
    )
    .context("building the student")?;
    let mut t = Trainer {
        s,
        train,
        heldout,
        rng: adaptq_quant::rng::Rng(s.seed ^ 0x7265_6669_6e65),
        trained: BTreeMap::new(),
        costs: BTreeMap::new(),
        norms_out: BTreeMap::new(),
    };
    let mut report = json!({
        "mode": crate::options::Choice::name(s.mode),
        "epochs": s.epochs,
        "lr": s.lr,
        "e2e_lr": s.e2e_lr.unwrap_or(s.lr),
        "kd_cosine_weight": s.cosine_weight,
        "top_k": s.top_k,
        "train_windows": train.len(),
        "heldout_windows": heldout.len(),
    });
    if s.mode.blockwise() {
        report["blockwise"] = t.blockwise(&mut student, &teacher, cal, progress)?;
    }
    // The blockwise phase's results are the end-to-end phase's starting point.
    t.apply(cal);
    if s.mode.e2e() {
        report["e2e"] = t.e2e(&mut student, teacher, cal, progress)?;
    }
    t.costs.retain(|_, c| c.is_finite());
    if !t.costs.is_empty() {
        let worst = t.costs.values().cloned().fold(0.0, f64::max);
        let mean = t.costs.values().sum::<f64>() / t.costs.len() as f64;
        report["ggml_reencode"] = json!({
            "layers": t.costs.len(),
            "mean_rel_error": mean,
            "max_rel_error": worst,
            "by_layer": t.costs,
        });
    }
    t.apply(cal);
    cal.overrides.extend(std::mem::take(&mut t.norms_out));
    Ok(report)
}

/// What a run carries from phase to phase: the settings and windows, the generator of each
/// epoch's window order, and what has been decided to write.
struct Trainer<'a> {
    s: &'a RefineSettings,
    train: &'a [Vec<u32>],
    heldout: &'a [Vec<u32>],
    rng: adaptq_quant::rng::Rng,
    trained: BTreeMap<String, LayerCodes>,
    /// Relative error of writing trained GGML scales onto their types' fields, by layer.
    costs: BTreeMap<String, f64>,
    /// Trained norm weights as their files store them, by name.
    norms_out: BTreeMap<String, Vec<f32>>,
}

impl Trainer<'_> {
    /// The numbers `0..n` in a seeded order (Fisher-Yates).
    fn order(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, self.rng.below(i + 1));
        }
        v
    }

    /// Puts the codes decided so far into `cal`.
    fn apply(&mut self, cal: &mut Calibration) {
        for (name, q) in std::mem::take(&mut self.trained) {
            if let Some(c) = cal.layers.get_mut(&name) {
                c.q = q;
                // Calibration's output error described the codes before refinement.
                c.output_rel_error = f64::NAN;
            }
        }
    }

    /// Writes what `params` hold into the student as the bundle would store it and judges it
    /// on the held-out windows: the codes are kept when the loss beats `before`.
    fn judge<'p>(
        &mut self,
        student: &mut Llama,
        params: impl Iterator<Item = &'p Param>,
        cal: &Calibration,
        before: f64,
        held: impl Fn(&Llama) -> Result<f64>,
    ) -> Result<(f64, bool)> {
        let mut out = Vec::new();
        for p in params {
            let (q, cost) = p.stored(&cal.layers[p.name()].q)?;
            put_stored(student, p.name(), &q)?;
            out.push((p.name().to_string(), q, cost));
        }
        let h = held(student)?;
        if h < before {
            for (name, q, cost) in out {
                if let Some(c) = cost {
                    self.costs.insert(name.clone(), c);
                }
                self.trained.insert(name, q);
            }
        }
        Ok((h, h < before))
    }

    fn keep_norms(&mut self, b: &adaptq_model::llama::Block) -> Result<()> {
        let (a, f) = b.norms();
        self.norms_out
            .insert(b.attn_norm_name.clone(), b.stored(a)?);
        self.norms_out.insert(b.ffn_norm_name.clone(), b.stored(f)?);
        Ok(())
    }

    /// Every block in turn ([`Trainer::block`]); the report's `blockwise` list.
    fn blockwise(
        &mut self,
        student: &mut Llama,
        teacher: &Llama,
        cal: &Calibration,
        progress: Progress,
    ) -> Result<serde_json::Value> {
        let n = student.blocks.len();
        let embed = |m: &Llama, ws: &[Vec<u32>]| -> Result<Vec<Tensor>> {
            ws.iter().map(|t| Ok(m.embed(t)?.detach())).collect()
        };
        let (mut xs, mut hs) = (embed(student, self.train)?, embed(student, self.heldout)?);
        let (mut ts, mut th) = (embed(teacher, self.train)?, embed(teacher, self.heldout)?);
        let mut blocks = Vec::new();
        for i in 0..n {
            progress("refine blockwise", i, n);
            let streams = [&mut xs, &mut hs, &mut ts, &mut th];
            blocks.push(self.block(i, student, teacher, cal, streams)?);
            progress("refine blockwise", i + 1, n);
        }
        Ok(json!(blocks))
    }

    /// Block `i` on the student's inputs `xs` (training windows) and `hs` (held out), fitted to
    /// the teacher's block on the teacher's own inputs `ts` and `th`, so that each block also
    /// makes up for the error the blocks before it left; all four advance to the blocks'
    /// outputs (the student's as stored).
    fn block(
        &mut self,
        i: usize,
        student: &mut Llama,
        teacher: &Llama,
        cal: &Calibration,
        [xs, hs, ts, th]: [&mut Vec<Tensor>; 4],
    ) -> Result<serde_json::Value> {
        let s = self.s;
        let run_block =
            |m: &Llama, x: &Tensor| -> Result<Tensor> { m.block(i, x, 0, None, &mut None) };
        let outs = |v: &[Tensor]| -> Result<Vec<Tensor>> {
            v.iter().map(|x| run_block(teacher, x)).collect()
        };
        *ts = outs(ts)?;
        *th = outs(th)?;
        let (targets, held_t) = (ts.clone(), th.clone());
        let p = BlockParams::new(student, i, cal)?;
        let vars = p.vars();
        let mut adam = Adam::new(vars.clone(), s.lr, s.epochs * xs.len())?;
        let held_of = |student: &Llama| -> Result<f64> {
            let mut sum = 0.0;
            for (x, t) in hs.iter().zip(&held_t) {
                sum += block_loss(&run_block(student, x)?, t, s.cosine_weight)?
                    .to_scalar::<f32>()? as f64;
            }
            Ok(sum / hs.len() as f64)
        };
        p.install(student, i, false)?;
        let mut best = Best::start(held_of(student)?, &vars)?;
        let (mut train_curve, mut held_curve) = (Vec::new(), vec![best.loss]);
        for epoch in 1..=s.epochs {
            let mut sum = 0.0;
            for j in self.order(xs.len()) {
                p.install(student, i, true)?;
                let loss = block_loss(&run_block(student, &xs[j])?, &targets[j], s.cosine_weight)?;
                sum += loss.to_scalar::<f32>()? as f64;
                adam.step(&loss.backward()?)?;
            }
            train_curve.push(sum / xs.len() as f64);
            p.install(student, i, false)?;
            let h = held_of(student)?;
            held_curve.push(h);
            if !best.offer(h, epoch, &vars)? {
                break;
            }
        }
        best.restore(&vars)?;
        p.install(student, i, false)?;
        // What the bundle will hold (f16 scales, GGML fields), judged on the held-out windows
        // again: kept only when it still beats the block as it came.
        let mut stored = None;
        if best.epoch > 0 {
            let (h, better) = self.judge(student, p.grids.iter(), cal, held_curve[0], held_of)?;
            stored = Some((h, better));
            if better {
                self.keep_norms(&student.blocks[i])?;
            } else {
                for g in &p.grids {
                    put_stored(student, g.name(), &cal.layers[g.name()].q)?;
                }
                let (a, f) = (p.norms.0.base.clone(), p.norms.1.base.clone());
                student.blocks[i].set_norms(a, f)?;
            }
        }
        let advance = |v: &[Tensor]| -> Result<Vec<Tensor>> {
            v.iter()
                .map(|x| Ok(run_block(student, x)?.detach()))
                .collect()
        };
        *xs = advance(xs)?;
        *hs = advance(hs)?;
        Ok(json!({
            "block": i,
            "train_loss": train_curve,
            "heldout_loss": held_curve,
            "kept_epoch": best.epoch,
            "heldout_stored": stored.map(|x| x.0),
            "written": stored.is_some_and(|x| x.1),
        }))
    }

    /// The whole model against the teacher's next-token distributions; the report's `e2e`.
    fn e2e(
        &mut self,
        student: &mut Llama,
        teacher: Llama,
        cal: &Calibration,
        progress: Progress,
    ) -> Result<serde_json::Value> {
        let (s, train, heldout) = (self.s, self.train, self.heldout);
        let steps = s.epochs * train.len();
        progress("refine e2e", 0, steps);
        let cache = |ws: &[Vec<u32>]| -> Result<Vec<TeacherLogits>> {
            ws.iter()
                .map(|t| teacher_logits(&teacher, t, s.top_k))
                .collect()
        };
        let (te_train, te_held) = (cache(train)?, cache(heldout)?);
        drop(teacher);
        let blocks: Vec<BlockParams> = (0..student.blocks.len())
            .map(|i| BlockParams::new(student, i, cal))
            .collect::<Result<_>>()?;
        let final_norm = NormParam::new(student.final_norm())?;
        let embedding = match cal.layers.get(&student.embed_name).map(|c| &c.q) {
            Some(q) => Some(Param::of(&student.embed_name, q)?),
            None => None,
        };
        let head = match cal.layers.get(&student.head_name) {
            Some(c) if !student.tied() => Some(Param::of(&student.head_name, &c.q)?),
            _ => None,
        };
        let mut vars: Vec<Var> = blocks.iter().flat_map(BlockParams::vars).collect();
        vars.push(final_norm.c.clone());
        vars.extend(embedding.iter().chain(head.iter()).flat_map(Param::vars));
        let install = |m: &mut Llama, track: bool| -> Result<()> {
            let fix =
                |t: Tensor| -> Result<Tensor> { Ok(if track { t } else { t.detach().copy()? }) };
            for (i, p) in blocks.iter().enumerate() {
                p.install(m, i, track)?;
            }
            m.set_final_norm(fix(final_norm.value()?)?)?;
            if let Some(e) = &embedding {
                m.set_embedding_tensor(fix(e.weight()?)?)?;
            }
            if let Some(h) = &head {
                let t = fix(h.weight()?)?;
                m.head_mut().context("an untied head")?.set_tensor(t)?;
            }
            Ok(())
        };
        let loss_of = |m: &Llama, tokens: &[u32], te: &TeacherLogits| -> Result<(Tensor, f64)> {
            let h = m.hidden(tokens, None, None)?;
            let kl = kl_loss(&m.head(&h)?, te)?;
            let klv = kl.to_scalar::<f32>()? as f64;
            Ok((
                (kl + (cosine_distance(&h, &te.hidden)? * s.cosine_weight)?)?,
                klv,
            ))
        };
        let held_of = |m: &Llama| -> Result<f64> {
            let mut sum = 0.0;
            for (t, te) in heldout.iter().zip(&te_held) {
                sum += loss_of(m, t, te)?.1;
            }
            Ok(sum / heldout.len() as f64)
        };
        let mut adam = Adam::new(vars.clone(), s.e2e_lr.unwrap_or(s.lr), steps)?;
        install(student, false)?;
        let mut best = Best::start(held_of(student)?, &vars)?;
        let (mut train_curve, mut held_curve) = (Vec::new(), vec![best.loss]);
        let mut done = 0;
        for epoch in 1..=s.epochs {
            let mut sum = 0.0;
            for j in self.order(train.len()) {
                install(student, true)?;
                let (loss, kl) = loss_of(student, &train[j], &te_train[j])?;
                sum += kl;
                adam.step(&loss.backward()?)?;
                done += 1;
                progress("refine e2e", done, steps);
            }
            train_curve.push(sum / train.len() as f64);
            install(student, false)?;
            let h = held_of(student)?;
            held_curve.push(h);
            if !best.offer(h, epoch, &vars)? {
                break;
            }
        }
        best.restore(&vars)?;
        install(student, false)?;
        progress("refine e2e", steps, steps);
        let mut stored = None;
        if best.epoch > 0 {
            let params = blocks
                .iter()
                .flat_map(|b| &b.grids)
                .chain(embedding.iter())
                .chain(head.iter());
            let (h, better) = self.judge(student, params, cal, held_curve[0], held_of)?;
            stored = Some((h, better));
            if better {
                for b in &student.blocks {
                    self.keep_norms(b)?;
                }
                let fin = student.final_norm_stored()?;
                self.norms_out.insert(student.final_norm_name.clone(), fin);
            }
        }
        Ok(json!({
            "train_kl": train_curve,
            "heldout_kl": held_curve,
            "kept_epoch": best.epoch,
            "heldout_kl_stored": stored.map(|x| x.0),
            "written": stored.is_some_and(|x| x.1),
            "embedding_trained": embedding.is_some(),
            "head_trained": head.is_some(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut r = adaptq_quant::rng::Rng(seed);
        (0..rows * cols).map(|_| r.gauss() as f32).collect()
    }

    fn weight_name(q: &LayerCodes) -> String {
        match q {
            LayerCodes::Ggml { ty, .. } => ty.name().to_string(),
            LayerCodes::Int(t) => format!("int{} {:?}", t.bits, t.grid),
            LayerCodes::Codebook(_) => "novaq".into(),
        }
    }

    fn weight(p: &Param) -> Vec<f32> {
        p.weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Untrained parameters decode to exactly the stored layer, and a trained one stores back
    /// what it computes (to f16): on both grids with a short last group, and on codebooks
    /// whose last vector is cut short.
    #[test]
    fn parameters_decode_as_the_layer_and_store_back() {
        let (rows, cols) = (64, 70);
        let w = matrix(rows, cols, 1);
        let mut layers = Vec::new();
        for grid in [Grid::Symmetric, Grid::Asymmetric] {
            let cfg = adaptq_quant::RtnConfig {
                bits: 3,
                group_size: 32,
                grid,
            };
            let q = adaptq_quant::quantize_rtn(&w, rows, cols, &cfg).unwrap();
            layers.push(LayerCodes::Int(q));
        }
        let ncfg = adaptq_quant::novaq::NovaqConfig {
            target_bits: 6.0,
            level1_centroids: 16,
            level2_centroids: 4,
            min_subspace_dim: 4,
            max_subspace_dim: 4,
            max_iterations: 3,
            ..Default::default()
        };
        let (t, _) = adaptq_quant::novaq::quantize_novaq(&w, rows, cols, None, &ncfg).unwrap();
        assert!(
            !cols.is_multiple_of(t.dim),
            "the last vector must be cut short"
        );
        layers.push(LayerCodes::Codebook(t));
        let wide = matrix(4, 512, 5);
        for ty in adaptq_quant::ggml::ALL {
            let bytes = adaptq_quant::ggml::quantize_rtn(ty, &wide, 4, 512, None, false).unwrap();
            layers.push(LayerCodes::Ggml {
                ty,
                rows: 4,
                cols: 512,
                bytes,
            });
        }
        for q in layers {
            let p = Param::of("l", &q).unwrap();
            assert_eq!(weight(&p), q.dequantize());
            let mut r = adaptq_quant::rng::Rng(2);
            for v in p.vars() {
                let n = v.as_tensor().elem_count();
                let x: Vec<f32> = (0..n).map(|_| 0.05 * r.gauss() as f32).collect();
                v.set(&Tensor::from_vec(x, v.as_tensor().dims(), &cpu()).unwrap())
                    .unwrap();
            }
            let moved = weight(&p);
            let stored = p.stored(&q).unwrap().0.dequantize();
            assert_ne!(stored, q.dequantize());
            // f16 scales; GGML k-quants also round sub-scales to integers of one step.
            let (num, den) = moved
                .iter()
                .zip(&stored)
                .fold((0f32, 0f32), |(n, d), (a, b)| {
                    (n + (a - b).powi(2), d + a * a)
                });
            let tol = match q {
                // Q2_K's sub-scales have 4 bits: a sixteenth of the step is their resolution.
                LayerCodes::Ggml {
                    ty: adaptq_quant::ggml::BlockType::Q2K,
                    ..
                } => 1e-2,
                LayerCodes::Ggml { ty, .. } if ty.is_k() => 2e-3,
                _ => 1e-5,
            };
            assert!(num / den <= tol, "{}: {}", weight_name(&q), num / den);
        }
    }

    /// The top-k KL is the exact KL when k covers the vocabulary, and zero for the teacher
    /// itself; its gradient points the student toward the teacher.
    #[test]
    fn topk_kl_is_the_kl() {
        let (t, v) = (3, 7);
        let te = Tensor::from_vec(matrix(t, v, 3), (t, v), &cpu()).unwrap();
        let st = Tensor::from_vec(matrix(t, v, 4), (t, v), &cpu()).unwrap();
        let zeros = Tensor::zeros((t, 1), DType::F32, &cpu()).unwrap();
        let cached = |k: usize| top_k(&te, zeros.clone(), k).unwrap();
        let exact = {
            let (p, q) = (te.to_vec2::<f32>().unwrap(), st.to_vec2::<f32>().unwrap());
            let lsm = |r: &Vec<f32>| {
                let lse = r.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
                r.iter().map(|x| *x as f64 - lse).collect::<Vec<_>>()
            };
            let mut kl = 0.0;
            for (a, b) in p.iter().zip(&q) {
                let (la, lb) = (lsm(a), lsm(b));
                kl += la
                    .iter()
                    .zip(&lb)
                    .map(|(x, y)| x.exp() * (x - y))
                    .sum::<f64>();
            }
            kl / t as f64
        };
        let full = kl_loss(&st, &cached(v))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((full - exact).abs() < 1e-5, "{full} vs {exact}");
        let part = kl_loss(&st, &cached(3))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(part > 0.0 && part <= exact + 1e-6, "{part} vs {exact}");
        let zero = kl_loss(&te, &cached(3))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(zero.abs() < 1e-5, "{zero}");
        let var = Var::from_tensor(&st).unwrap();
        let g = kl_loss(var.as_tensor(), &cached(v))
            .unwrap()
            .backward()
            .unwrap();
        let stepped =
            (var.as_tensor() - g.get(var.as_tensor()).unwrap().affine(0.5, 0.0).unwrap()).unwrap();
        let after = kl_loss(&stepped, &cached(v))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(after < full, "{after} vs {full}");
    }

    #[test]
    fn step_size_decays_from_lr_to_zero() {
        let v = Var::zeros(2, DType::F32, &cpu()).unwrap();
        let mut adam = Adam::new(vec![v.clone()], 0.01, 4).unwrap();
        let mut rates = Vec::new();
        for _ in 0..4 {
            let g = v.as_tensor().sum_all().unwrap().backward().unwrap();
            adam.step(&g).unwrap();
            rates.push(adam.rate());
        }
        assert_eq!(rates[0], 0.01);
        assert!(rates.windows(2).all(|w| w[1] < w[0]), "{rates:?}");
        assert!((rates[2] - 0.005).abs() < 1e-12, "{rates:?}");
        // Adam's first moves are about the step size; the sum of the rates bounds them.
        let moved = v.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            moved < 0.0 && -moved <= rates.iter().sum::<f64>() + 1e-6,
            "{moved}"
        );
    }
}
