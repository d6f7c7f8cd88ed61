//! Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM): RMSNorm, rotary embeddings in
//! either pairing convention (with Llama 3's per-frequency factors when the file has them),
//! grouped-query attention, optional q/k norms, SwiGLU MLP, tied or separate output head.
//! Gemma 2 and 3 run as the same blocks with the extras of [`crate::gemma`], so calibration walks
//! them alike.
//!
//! The forward pass is exposed in pieces (`embed`, `block`, `head`) so calibration can run the
//! network layer by layer, and every linear layer's input can be handed to a hook.

use crate::blockdot::BlockMatrix;
use crate::gemma::{GemmaModel, PostNorms};
use crate::halfmat::{F16Matrix, RowMatrix};
use crate::intgrid::IntMatrix;
use crate::lookup::CodebookMatrix;
use crate::weights::Stored;
use crate::Weights;
use adaptq_source::model::{ModelDesc, RopeStyle};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::borrow::Cow;
use std::sync::Arc;

pub mod moe;

/// Called with (weight tensor name, input activations `[tokens, in_features]`) before each
/// linear layer runs. q/k/v share one input; the hook sees it once per weight name.
pub type Hook<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

pub struct Linear {
    pub name: String,
    m: Matrix,
    /// `[out, in]`.
    dims: (usize, usize),
    bias: Option<Tensor>,
}

/// How a linear layer's weight is held.
enum Matrix {
    /// f32, transposed to `[in, out]` so `x @ wt` is a plain row-major gemm: the exact function
    /// the stored codes define.
    Dense(Tensor),
    /// The stored GGML blocks, `[out, in]`, run by candle's quantized kernels, which round each
    /// row of activations to 8 bits first, as llama.cpp does: a quarter or less of the memory
    /// and of the bytes read per token.
    Blocks(QMatMul),
    /// An integer grid without a GGML twin, on adaptq's own kernel (same activation rounding
    /// idea, blocks of 32 with f32 steps).
    Int(IntMatrix),
    /// f16 values (shared with the embedding table when the head is tied).
    F16(Arc<F16Matrix>),
    /// f32 values row-major, for the packed runtime's one-row products.
    F32(Arc<RowMatrix<f32>>),
    /// NOVAQ codebooks, on the lookup kernel.
    Codebook(CodebookMatrix),
    /// GGML blocks on adaptq's own dot kernels ([`crate::blockdot`]).
    BlockDot(Arc<BlockMatrix>),
}

/// Which kernels a loaded model runs its linear layers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Every weight dequantized to f32 at load: the reference the quality figures are taken on.
    #[default]
    Exact,
    /// Weights stored as GGML blocks (or integer grids that re-lay onto one exactly) stay in
    /// their blocks and run through quantized matmuls; anything else is dequantized.
    Packed,
}

impl Kernels {
    /// `exact` or `packed`, as reports name them.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Exact => "exact",
            Kernels::Packed => "packed",
        }
    }
}

/// Rows of activations from which a packed layer multiplies in f32 ([`round_rows`], or the
/// kernel's own rounding) rather than row by row on its kernel: the integer kernels redo each
/// weight block's unpacking for every row, while dequantizing the weight costs one pass.
const GEMM_ROWS: usize = 32;

/// Queries per task of a prompt's attention.
const ATTN_QUERIES: usize = 32;

/// `x: [T, k]` with each row rounded as the block kernels of `dtype` round activations before
/// their integer dot products (8-bit blocks of 32, or of 256 for k-quants). Multiplied in f32
/// by the dequantized weight, the rounded rows give the kernels' products up to the order of
/// the float sums: a batch computes the same function as token-by-token decoding.
fn round_rows(x: &Tensor, dtype: GgmlDType) -> Result<Tensor> {
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType};
    fn round<T: GgmlType>(v: &mut [f32], k: usize) {
        let mut blocks = vec![T::zeros(); k / T::BLCK_SIZE];
        for row in v.chunks_mut(k) {
            T::from_float(row, &mut blocks);
            T::to_float(&blocks, row);
        }
    }
    let (t, k) = x.dims2()?;
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    // The activation type each weight type's dot product takes (candle's `VecDotType`).
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => round::<BlockQ8_0>(&mut v, k),
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => round::<BlockQ8_1>(&mut v, k),
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
            round::<BlockQ8K>(&mut v, k)
        }
        _ => return Ok(x.clone()),
    }
    Ok(Tensor::from_vec(v, (t, k), &Device::Cpu)?)
}

/// A weight held as stored, for [`Kernels::Packed`].
enum Packed {
    Blocks(QTensor),
    BlockDot(BlockMatrix),
    Int(IntMatrix),
    Codebook(CodebookMatrix),
    F16(F16Matrix),
}

/// `name` (`[out, in]` = `dims`) as the packed kernels take it, when the weights store it in a
/// form they run: GGML blocks of a type candle runs, an integer grid, f16.
fn load_packed(w: &dyn Weights, name: &str, dims: (usize, usize)) -> Result<Option<Packed>> {
    let n = dims
        .0
        .checked_mul(dims.1)
        .context("tensor size overflows")?;
    let misfit = || anyhow::anyhow!("tensor '{name}': its stored data does not hold {dims:?}");
    Ok(match w.stored(name)? {
        Some(Stored::Blocks(ty, bytes)) => {
            let Some(dtype) = adaptq_source::gguf::candle_dtype(ty) else {
                return Ok(None);
            };
            if !dims.1.is_multiple_of(ty.block_len()) || bytes.len() != ty.bytes_for(n) {
                return Err(misfit());
            }
            if crate::blockdot::runs(ty) {
                let m = BlockMatrix::new(ty, bytes, dims.0, dims.1)
                    .with_context(|| format!("tensor '{name}'"))?;
                return Ok(Some(Packed::BlockDot(m)));
            }
            let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
            Some(Packed::Blocks(QTensor::new(storage, dims)?))
        }
        Some(Stored::Int(g)) => {
            let m = IntMatrix::new(&g).with_context(|| format!("tensor '{name}'"))?;
            if m.dims() != dims {
                return Err(misfit());
            }
            Some(Packed::Int(m))
        }
        Some(Stored::Codebook(c)) => {
            let m = CodebookMatrix::new(&c).with_context(|| format!("tensor '{name}'"))?;
            if m.dims() != dims {
                return Err(misfit());
            }
            Some(Packed::Codebook(m))
        }
        Some(Stored::F16(v)) => Some(Packed::F16(
            F16Matrix::new(v, dims.0, dims.1).ok_or_else(misfit)?,
        )),
        None => None,
    })
}

/// A weight the packed runtime multiplies one row of activations at a time on its own kernel,
/// and a batch through f32 gemm on the weight dequantized (the same function).
pub(crate) trait RowKernel: Sync {
    /// `[out, in]`.
    fn dims(&self) -> (usize, usize);
    /// Rows `first..` of the weight as f32 into `out` (whole rows).
    fn rows_into(&self, first: usize, out: &mut [f32]);
    /// The weight itself, row-major, where it is stored as f32.
    fn as_f32(&self) -> Option<&[f32]> {
        None
    }
    /// `out = W · x` for one row of activations.
    fn gemv(&self, x: &[f32], out: &mut [f32]);
    /// Rounds one row of a batch in place as the kernel rounds activations (where it does).
    fn round_batch_row(&self, _x: &mut [f32]) {}
}

/// Weight rows dequantized per task of a batch's product.
const DEQUANT_ROWS: usize = 64;

/// `x: [T, in]` times a [`RowKernel`] weight: row by row, or for a batch of [`GEMM_ROWS`] or
/// more the batch's rows (rounded, in parallel) times the weight dequantized in parallel, in
/// one f32 gemm.
fn kernel_forward(m: &dyn RowKernel, x: &Tensor) -> Result<Tensor> {
    use crate::dense::{mul, Right, View};
    use rayon::prelude::*;
    let (t, k) = x.dims2()?;
    let (n, _) = m.dims();
    let mut xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; t * n];
    if k == 0 {
        return Ok(Tensor::from_vec(out, (t, n), &Device::Cpu)?);
    }
    if t >= GEMM_ROWS {
        xs.par_chunks_mut(k).for_each(|r| m.round_batch_row(r));
        let owned;
        let w = match m.as_f32() {
            Some(w) => w,
            None => {
                let mut w = vec![0f32; n * k];
                w.par_chunks_mut(k * DEQUANT_ROWS)
                    .enumerate()
                    .for_each(|(i, c)| m.rows_into(i * DEQUANT_ROWS, c));
                owned = w;
                &owned
            }
        };
        let (a, b) = (View::dense(&xs, t, k), View::dense(w, n, k));
        mul(a, b, Right::Transposed, &mut out, n, true);
    } else {
        for (row, o) in xs.chunks(k).zip(out.chunks_mut(n)) {
            m.gemv(row, o);
        }
    }
    Ok(Tensor::from_vec(out, (t, n), &Device::Cpu)?)
}

impl Linear {
    /// Loads `name`, which must be `[out, in]` as the model's dimensions say.
    fn load(
        w: &dyn Weights,
        name: &str,
        bias: Option<&str>,
        (o, i): (usize, usize),
        kernels: Kernels,
    ) -> Result<Self> {
        let (rows, cols) = w.matrix(name)?;
        if (rows, cols) != (o, i) {
            bail!(
                "tensor '{name}' is [{rows}, {cols}], but the model's dimensions need [{o}, {i}]"
            );
        }
        let packed = match kernels {
            Kernels::Packed => load_packed(w, name, (rows, cols))?,
            Kernels::Exact => None,
        };
        let m = match packed {
            Some(Packed::Blocks(q)) => Matrix::Blocks(QMatMul::from_qtensor(q)?),
            Some(Packed::Int(m)) => Matrix::Int(m),
            Some(Packed::BlockDot(m)) => Matrix::BlockDot(Arc::new(m)),
            Some(Packed::Codebook(m)) => Matrix::Codebook(m),
            Some(Packed::F16(m)) => Matrix::F16(Arc::new(m)),
            None => {
                let v = w.read(name)?;
                match kernels {
                    Kernels::Packed => Matrix::F32(Arc::new(
                        RowMatrix::new(v, rows, cols).context("tensor size")?,
                    )),
                    Kernels::Exact => Matrix::Dense(
                        Tensor::from_vec(v, (rows, cols), &Device::Cpu)?
                            .t()?
                            .contiguous()?,
                    ),
                }
            }
        };
        let bias = match bias {
            Some(b) if w.has(b) => Some(Tensor::from_vec(w.read(b)?, rows, &Device::Cpu)?),
            _ => None,
        };
        Ok(Linear {
            name: name.to_string(),
            m,
            dims: (rows, cols),
            bias,
        })
    }

    /// A bias-free layer over a weight already in memory.
    fn from_matrix(name: &str, m: Matrix, dims: (usize, usize)) -> Self {
        Linear {
            name: name.to_string(),
            m,
            dims,
            bias: None,
        }
    }

    fn forward(&self, x: &Tensor, hook: &mut Option<Hook>) -> Result<Tensor> {
        if let Some(h) = hook.as_mut() {
            h(&self.name, x)?;
        }
        let y = match &self.m {
            Matrix::Dense(wt) => x.matmul(wt)?,
            Matrix::Blocks(QMatMul::QTensor(q)) if x.dims2()?.0 >= GEMM_ROWS => {
                let w = q.dequantize(&Device::Cpu)?;
                round_rows(x, q.dtype())?.matmul(&w.t()?)?
            }
            Matrix::Blocks(q) => q.forward(x)?,
            Matrix::Int(m) => kernel_forward(m, x)?,
            Matrix::BlockDot(m) => kernel_forward(m.as_ref(), x)?,
            Matrix::F16(m) => kernel_forward(m.as_ref(), x)?,
            Matrix::F32(m) => kernel_forward(m.as_ref(), x)?,
            Matrix::Codebook(m) => kernel_forward(m, x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.dims.0
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.dims.1
    }

    /// Whether the weight runs from its stored codes ([`Kernels::Packed`]).
    pub fn is_packed(&self) -> bool {
        !matches!(self.m, Matrix::Dense(_))
    }

    /// The current weight, row-major `[out, in]`.
    pub fn weight_rows(&self) -> Result<(Vec<f32>, usize, usize)> {
        let (o, i) = self.dims;
        let w = match &self.m {
            Matrix::Dense(wt) => wt.t()?.contiguous()?,
            Matrix::Blocks(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            Matrix::Blocks(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.clone(),
            Matrix::Int(m) => Tensor::from_vec(m.dequantize(), self.dims, &Device::Cpu)?,
            Matrix::BlockDot(m) => Tensor::from_vec(m.dequantize(), self.dims, &Device::Cpu)?,
            Matrix::F16(m) => Tensor::from_vec(m.to_f32(), self.dims, &Device::Cpu)?,
            Matrix::F32(m) => Tensor::from_vec(m.to_f32(), self.dims, &Device::Cpu)?,
            Matrix::Codebook(m) => Tensor::from_vec(m.dequantize(), self.dims, &Device::Cpu)?,
        };
        Ok((
            w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            o,
            i,
        ))
    }

    /// [`Linear::weight_rows`], the layer left holding no weight until [`Linear::set_weight`]:
    /// calibration rounds the copy, and for a 14336-wide layer keeping both would add 235 MB
    /// to its peak.
    pub fn take_weight(&mut self) -> Result<(Vec<f32>, usize, usize)> {
        let w = self.weight_rows()?;
        self.m = Matrix::Dense(Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?);
        Ok(w)
    }

    /// Replaces the weight by `w: [out, in]` as it is, without copying: when `w` was computed
    /// from `Var`s, products through this layer carry gradients back to them (refinement).
    pub fn set_tensor(&mut self, w: Tensor) -> Result<()> {
        if w.dims2()? != self.dims {
            bail!(
                "weight for '{}' is {:?}, the layer is {:?}",
                self.name,
                w.dims(),
                self.dims
            );
        }
        self.m = Matrix::Dense(w.t()?);
        Ok(())
    }

    /// Replaces the weight (row-major `[out, in]`), e.g. with a quantized reconstruction.
    pub fn set_weight(&mut self, w: Vec<f32>) -> Result<()> {
        self.m = Matrix::Dense(
            Tensor::from_vec(w, self.dims, &Device::Cpu)?
                .t()?
                .contiguous()?,
        );
        Ok(())
    }
}

pub struct Block {
    pub attn_norm_name: String,
    attn_norm: Tensor,
    /// The projections of the attention input: q, k and v, or Phi-3's one `attn_qkv` whose
    /// output rows are Q | K | V. Kept fused, as the file has it: every quantizer rounds rows
    /// on their own against the shared input, so the parts come out as if rounded apart.
    pub qkv: Vec<Linear>,
    pub o: Linear,
    pub ffn_norm_name: String,
    ffn_norm: Tensor,
    /// What the norm weights were stored without (1 for Hugging Face Gemma, else 0).
    norm_offset: f32,
    pub mlp: Mlp,
    /// RMSNorm of each query and key head (Qwen3, Gemma 3).
    pub qk_norm: Option<QkNorm>,
    /// Gemma's norms after attention and the MLP.
    pub post_norms: Option<PostNorms>,
}

/// The MLP of a block.
pub enum Mlp {
    /// SwiGLU (GeGLU for Gemma): gate and up, or Phi-3's one `ffn_up` whose rows are
    /// gate | up; then down.
    Dense { gate_up: Vec<Linear>, down: Linear },
    /// A sparse mixture of experts.
    Moe(Box<moe::Experts>),
}

/// RMSNorm of queries and keys before RoPE: per head (`[head_dim]` weights), or over the
/// whole projection (OLMoE, `[heads · head_dim]`).
pub struct QkNorm {
    q: Tensor,
    k: Tensor,
    full: bool,
}

impl QkNorm {
    /// Normalizes `q: [T, H, hd]` and `k: [T, KV, hd]`.
    fn apply(&self, q: &Tensor, k: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        if self.full {
            let whole = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
                let (t, h, hd) = x.dims3()?;
                Ok(rms_norm(&x.reshape((t, h * hd))?, w, eps)?.reshape((t, h, hd))?)
            };
            return Ok((whole(q, &self.q)?, whole(k, &self.k)?));
        }
        Ok((rms_norm(q, &self.q, eps)?, rms_norm(k, &self.k, eps)?))
    }
}

impl Block {
    /// Divides the attention norm's weight by `s` per channel (AWQ folds input scales here).
    pub fn div_attn_norm(&mut self, s: &[f32]) -> Result<Vec<f32>> {
        self.attn_norm = div_vec(&self.attn_norm, s)?;
        self.stored(&self.attn_norm)
    }
    /// Divides the MLP norm's weight by `s` per channel.
    pub fn div_ffn_norm(&mut self, s: &[f32]) -> Result<Vec<f32>> {
        self.ffn_norm = div_vec(&self.ffn_norm, s)?;
        self.stored(&self.ffn_norm)
    }

    /// The attention and MLP norms' weights as the forward pass multiplies by them.
    pub fn norms(&self) -> (&Tensor, &Tensor) {
        (&self.attn_norm, &self.ffn_norm)
    }

    /// What the file's norm weights are stored without (1 for Hugging Face Gemma, else 0).
    pub fn norm_offset(&self) -> f32 {
        self.norm_offset
    }

    /// Replaces the attention and MLP norms' weights (as multiplied, see [`Block::norms`]);
    /// tensors computed from `Var`s carry gradients back to them.
    pub fn set_norms(&mut self, attn: Tensor, ffn: Tensor) -> Result<()> {
        if attn.dims() != self.attn_norm.dims() || ffn.dims() != self.ffn_norm.dims() {
            bail!("norm weights of the wrong size");
        }
        self.attn_norm = attn;
        self.ffn_norm = ffn;
        Ok(())
    }

    /// A norm's weight as its file stores it (Hugging Face Gemma: less the 1 added at load).
    pub fn stored(&self, norm: &Tensor) -> Result<Vec<f32>> {
        Ok(norm
            .to_vec1::<f32>()?
            .into_iter()
            .map(|x| x - self.norm_offset)
            .collect())
    }

    /// Every quantizable linear layer, in the order the block runs them (a mixture's router
    /// is not one).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = self.qkv.iter().collect();
        v.push(&self.o);
        match &self.mlp {
            Mlp::Dense { gate_up, down } => {
                v.extend(gate_up);
                v.push(down);
            }
            Mlp::Moe(e) => v.extend(e.linears()),
        }
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self.qkv.iter_mut().collect();
        v.push(&mut self.o);
        match &mut self.mlp {
            Mlp::Dense { gate_up, down } => {
                v.extend(gate_up);
                v.push(down);
            }
            Mlp::Moe(e) => v.extend(e.linears_mut()),
        }
        v
    }

    /// A dense MLP's gate and up layers (or fused gate | up), and its down layer.
    pub fn dense_mlp(&mut self) -> Option<(&mut Vec<Linear>, &mut Linear)> {
        match &mut self.mlp {
            Mlp::Dense { gate_up, down } => Some((gate_up, down)),
            Mlp::Moe(_) => None,
        }
    }

    /// The mixture of experts, if the block has one.
    pub fn experts(&self) -> Option<&moe::Experts> {
        match &self.mlp {
            Mlp::Moe(e) => Some(e),
            Mlp::Dense { .. } => None,
        }
    }

    pub fn experts_mut(&mut self) -> Option<&mut moe::Experts> {
        match &mut self.mlp {
            Mlp::Moe(e) => Some(e),
            Mlp::Dense { .. } => None,
        }
    }
}

/// The outputs of `ls` on `x` cut into parts of the `widths` given: one output per layer, or
/// one fused layer's output cut in columns.
fn project(
    ls: &[Linear],
    x: &Tensor,
    widths: &[usize],
    hook: &mut Option<Hook>,
) -> Result<Vec<Tensor>> {
    if ls.len() == widths.len() {
        let one_token = hook.is_none() && x.dims2()?.0 < GEMM_ROWS;
        if one_token && !crate::team::open() && ls.iter().all(|l| l.is_packed()) {
            // One token: the products share one parallel region, so the pool's threads go
            // from one to the next instead of sleeping and waking between them.
            let mut outs: Vec<Option<Result<Tensor>>> = ls.iter().map(|_| None).collect();
            rayon::scope(|s| {
                for (l, o) in ls.iter().zip(outs.iter_mut()) {
                    s.spawn(move |_| *o = Some(l.forward(x, &mut None)));
                }
            });
            return outs
                .into_iter()
                .map(|o| o.expect("each task ran"))
                .collect();
        }
        return ls.iter().map(|l| l.forward(x, hook)).collect();
    }
    let y = ls[0].forward(x, hook)?;
    let mut at = 0;
    widths
        .iter()
        .map(|&w| {
            let part = y.narrow(1, at, w)?;
            at += w;
            Ok(part)
        })
        .collect()
}

fn div_vec(t: &Tensor, s: &[f32]) -> Result<Tensor> {
    let v: Vec<f32> = t.to_vec1::<f32>()?;
    if v.len() != s.len() {
        bail!(
            "norm of {} channels cannot take {} scales",
            v.len(),
            s.len()
        );
    }
    let out: Vec<f32> = v.iter().zip(s).map(|(a, b)| a / b).collect();
    Ok(Tensor::from_vec(out, v.len(), &Device::Cpu)?)
}

/// Keys and values of earlier positions, per layer, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

/// One layer's cached keys and values, `[positions, kv_heads · head_dim]` row-major, grown in
/// place (amortized) rather than concatenated anew at every token.
#[derive(Default)]
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

impl LayerKv {
    /// Appends `k`, `v`: `[T, KV, hd]`.
    fn push(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        self.k.extend(k.flatten_all()?.to_vec1::<f32>()?);
        self.v.extend(v.flatten_all()?.to_vec1::<f32>()?);
        self.len += k.dims()[0];
        Ok(())
    }

    /// Every cached key and value as `[S, KV, hd]` tensors.
    fn tensors(&self, kv: usize, hd: usize) -> Result<(Tensor, Tensor)> {
        let shape = (self.len, kv, hd);
        Ok((
            Tensor::from_slice(&self.k, shape, &Device::Cpu)?,
            Tensor::from_slice(&self.v, shape, &Device::Cpu)?,
        ))
    }
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The online half of a rotated model (`--rotate`): every linear layer's input is multiplied by
/// a seeded Hadamard-type rotation `R` on the fly and its weight stored as `W·R`, so the layer
/// computes the same product while the weight's rows are incoherent (outlier columns spread
/// over the whole row), which is what weight quantizers like.
struct Rotated {
    seed: u64,
    /// Normalized block inputs (q/k/v and gate/up read them).
    hidden: adaptq_quant::hadamard::Rotation,
    /// The attention output (o reads it).
    attn: adaptq_quant::hadamard::Rotation,
    /// SwiGLU's output (down reads it), e.g. 1536 = 512·3 wide.
    ffn: adaptq_quant::hadamard::Rotation,
    /// The three rotations as dense matrices (hidden, attn, ffn) while the model is
    /// differentiable ([`Llama::set_differentiable`]): the fast transform leaves candle's graph.
    dense: Option<Box<[Tensor; 3]>>,
}

impl Rotated {
    /// `x·R` for every row of `x`, `which` 0 = hidden, 1 = attention output, 2 = SwiGLU output.
    fn rows(&self, x: &Tensor, which: usize) -> Result<Tensor> {
        match &self.dense {
            Some(d) => Ok(x.matmul(&d[which])?),
            None => rot_rows(x, [&self.hidden, &self.attn, &self.ffn][which]),
        }
    }
}

/// `x·R` for every row of `x: [T, n]`, by the fast transform.
fn rot_rows(x: &Tensor, r: &adaptq_quant::hadamard::Rotation) -> Result<Tensor> {
    let (t, n) = x.dims2()?;
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    r.apply_rows(&mut v);
    Ok(Tensor::from_vec(v, (t, n), &Device::Cpu)?)
}

pub struct Llama {
    pub desc: ModelDesc,
    /// The embedding table; `None` while unloaded ([`Llama::unload_embedding`]).
    embed: Option<Table>,
    /// `(vocab, hidden)` of the embedding table, known while it is unloaded too.
    embed_dims: (usize, usize),
    /// Source name of the embedding table.
    pub embed_name: String,
    /// Source name of the output head (unused when tied).
    pub head_name: String,
    /// Source name of the final norm.
    pub final_norm_name: String,
    /// The output head; `None` until [`Llama::load_head`] (a calibration streamed block by
    /// block never needs it unless it quantizes the head).
    head: Option<Linear>,
    /// What the linear layers (and the embedding table) run on.
    kernels: Kernels,
    tied: bool,
    final_norm: Tensor,
    /// The blocks in memory: all of them after [`Llama::load`], none after
    /// [`Llama::load_shell`] (calibration then loads them one at a time with
    /// [`Llama::load_block`]).
    pub blocks: Vec<Block>,
    /// How the file names and fuses the blocks' tensors.
    layout: Layout,
    /// Inverse frequencies θ_i = base^(-2i/head_dim) (of the global layers, for Gemma 3).
    inv_freq: Vec<f32>,
    /// Phi-3's other frequency set (the long one, unless [`Llama::set_context`] swapped them).
    inv_freq_other: Option<Vec<f32>>,
    /// Whether `inv_freq` holds the long factors.
    long_rope: bool,
    /// Gemma 3's model-wide settings.
    gemma: Option<GemmaModel>,
    /// Rotations the blocks' weights carry (`--rotate`), applied online where they cannot be
    /// folded.
    rotation: Option<Box<Rotated>>,
}

/// The token embedding table, `[vocab, hidden]`.
enum Table {
    Dense(Tensor),
    /// Stored blocks ([`Kernels::Packed`]): rows are dequantized as tokens look them up, and a
    /// tied head multiplies by the same blocks.
    Blocks(Arc<QTensor>),
    BlockDot(Arc<BlockMatrix>),
    F16(Arc<F16Matrix>),
    F32(Arc<RowMatrix<f32>>),
}

/// How a file names and fuses a block's tensors, read once so blocks can be loaded later.
#[derive(Clone, Copy)]
struct Layout {
    gguf: bool,
    /// Phi-3 stores q/k/v as one `attn_qkv` and gate/up as one `ffn_up` of twice the width.
    fused_qkv: bool,
    fused_gate_up: bool,
    /// Gemma's norms multiply by `1 + w`; llama.cpp's converter stores the sum in GGUF files,
    /// Hugging Face checkpoints store `w`.
    norm_offset: f32,
    /// Mixtral's Hugging Face names (`block_sparse_moe.experts.J.w1`) rather than Qwen-MoE's
    /// and OLMoE's (`mlp.experts.J.gate_proj`).
    sparse_moe_names: bool,
}

impl Layout {
    /// Block `i`'s tensor, GGUF name `g` or Hugging Face name `h`.
    fn name(&self, i: usize, g: &str, h: &str) -> String {
        if self.gguf {
            format!("blk.{i}.{g}")
        } else {
            format!("model.layers.{i}.{h}")
        }
    }
}

/// Per-frequency RoPE divisors of Llama 3.1-style GGUF files, `[head_dim / 2]`.
const ROPE_FREQS: &str = "rope_freqs.weight";
/// Hugging Face names of Gemma's norms after attention and the MLP.
const POST_ATTN_HF: &str = "post_attention_layernorm.weight";
const POST_FFN_HF: &str = "post_feedforward_layernorm.weight";

/// Inverse RoPE frequencies of the model, and Phi-3's long ones. Per-frequency divisors apply
/// as `ggml_rope_ext` applies `freq_factors`: Llama 3.1's `rope_freqs`, or Phi-3's short
/// factors (its long ones past the trained context). GGUF files hold them as tensors,
/// `config.json` in `rope_scaling`.
fn rope_inv_freqs(
    desc: &ModelDesc,
    w: &dyn Weights,
    gguf: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let hd = desc.head_dim();
    let scale = desc.decoder.gemma.as_ref().map_or(1.0, |g| g.rope_scale);
    let base = inv_freq(desc.rope_theta, hd, scale);
    let factored = |names: &[&str], cfg: &Option<Vec<f32>>| -> Result<Option<Vec<f32>>> {
        let f = match names.iter().find(|n| gguf && w.has(n)) {
            Some(name) => vec_tensor(w, name, hd / 2)?.to_vec1::<f32>()?,
            None if gguf => return Ok(None),
            None => match cfg {
                Some(f) if f.len() == hd / 2 => f.clone(),
                Some(f) => bail!("{} RoPE factors for {} frequencies", f.len(), hd / 2),
                None => return Ok(None),
            },
        };
        Ok(Some(base.iter().zip(f).map(|(x, f)| x / f).collect()))
    };
    let traits = &desc.decoder;
    let short = factored(
        &[ROPE_FREQS, "rope_factors_short.weight"],
        &traits.rope_factors,
    )?;
    let long = factored(&["rope_factors_long.weight"], &traits.rope_factors_long)?;
    Ok((short.unwrap_or(base), long))
}

/// A norm's weight plus `offset`, which must have `len` values.
fn norm_tensor(w: &dyn Weights, name: &str, len: usize, offset: f32) -> Result<Tensor> {
    let t = vec_tensor(w, name, len)?;
    Ok(if offset == 0.0 {
        t
    } else {
        (t + offset as f64)?
    })
}

/// A vector tensor, which must have `len` values.
pub(crate) fn vec_tensor(w: &dyn Weights, name: &str, len: usize) -> Result<Tensor> {
    let v = w.read(name).with_context(|| format!("reading '{name}'"))?;
    let n = v.len();
    if n != len {
        bail!("tensor '{name}' holds {n} values, but the model's dimensions need {len}");
    }
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
}

/// Inverse RoPE frequencies `scale · base^(-2i/hd)`; `scale` is linear position scaling.
pub(crate) fn inv_freq(base: f32, hd: usize, scale: f32) -> Vec<f32> {
    (0..hd / 2)
        .map(|i| ((base as f64).powf(-2.0 * i as f64 / hd as f64) * scale as f64) as f32)
        .collect()
}

/// RMSNorm over the last dimension, times `w`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps as f64)?.sqrt()?)?
        .broadcast_mul(w)?)
}

/// Additive mask `[T, S]` for `t` queries that follow `s - t` cached positions: a key is hidden
/// when it comes after the query or, with a sliding `window`, is `window` or more positions
/// behind it. `None` when nothing is hidden (one query, all keys within reach).
fn attention_mask(t: usize, s: usize, window: Option<usize>) -> Result<Option<Tensor>> {
    let past = s - t;
    let hidden = |i: usize, j: usize| j > past + i || window.is_some_and(|w| past + i - j >= w);
    if t == 1 && window.is_none_or(|w| s <= w) {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if hidden(i, j) { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (t, s), &Device::Cpu)?))
}

/// One query head's view of a layer's cache: columns `at..at + hd` of cached rows `lo..=pos`.
struct Keys<'a> {
    kv: &'a LayerKv,
    width: usize,
    at: usize,
    lo: usize,
    pos: usize,
}

impl Keys<'_> {
    /// Adds to `out` the values weighted by `probs` of the query's scores against the keys
    /// (`p` holds the scores). Compiled for AVX-512 where the CPU has it, so the per-key dot
    /// products inline rather than each checking the CPU and calling out; the same sums.
    fn attend(&self, q: &[f32], p: &mut Vec<f32>, probs: &dyn Fn(&mut [f32]), out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { self.attend_avx512(q, p, probs, out) };
        }
        self.attend_with(dot, q, p, probs, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn attend_avx512(
        &self,
        q: &[f32],
        p: &mut Vec<f32>,
        probs: &dyn Fn(&mut [f32]),
        out: &mut [f32],
    ) {
        self.attend_with(|a, b| unsafe { dot_avx512(a, b) }, q, p, probs, out)
    }

    /// Plain loops: the body takes its caller's target features.
    #[inline(always)]
    fn attend_with(
        &self,
        dot: impl Fn(&[f32], &[f32]) -> f32,
        q: &[f32],
        p: &mut Vec<f32>,
        probs: &dyn Fn(&mut [f32]),
        out: &mut [f32],
    ) {
        let (hd, kv) = (out.len(), self.kv);
        p.clear();
        for j in self.lo..=self.pos {
            let at = j * self.width + self.at;
            p.push(dot(q, &kv.k[at..at + hd]));
        }
        probs(p);
        for (j, &w) in (self.lo..=self.pos).zip(p.iter()) {
            let at = j * self.width + self.at;
            for (o, &v) in out.iter_mut().zip(&kv.v[at..at + hd]) {
                *o += w * v;
            }
        }
    }
}

/// `a · b`, on the AVX2 build of the loop where the CPU has it (the crate is built for any
/// x86-64, whose vectors are half as wide).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { dot_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { dot_avx2(a, b) };
    }
    dot_any(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_any(a, b)
}

/// `a · b` in four registers of 16 fused multiply-adds: a one-token product reads each weight
/// once, and 64-byte loads keep the stream at memory speed where 32-byte ones fall short. One
/// body for f32 and f16 weights (`$load` makes 16 lanes of f32 from `$a` at an offset, `$wide`
/// one value), so an f16 row widened in the register sums exactly as its widened copy would.
#[cfg(target_arch = "x86_64")]
macro_rules! dot_avx512_body {
    ($a:ident, $b:ident, $load:expr, $wide:expr) => {{
        use std::arch::x86_64::*;
        let n = $a.len().min($b.len());
        let pb = $b.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let y = _mm512_loadu_ps(pb.add(i + 16 * k));
                *acc = _mm512_fmadd_ps($load(i + 16 * k), y, *acc);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps($load(i), _mm512_loadu_ps(pb.add(i)), acc[0]);
            i += 16;
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let tail: f32 = $a[i..n]
            .iter()
            .zip(&$b[i..n])
            .map(|(x, y)| $wide(*x) * y)
            .sum();
        _mm512_reduce_add_ps(sum) + tail
    }};
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    let pa = a.as_ptr();
    dot_avx512_body!(a, b, |i| _mm512_loadu_ps(pa.add(i)), |x: f32| x)
}

/// `w · x` for f16 weights, 16 at a time widened in the register (`vcvtph2ps`, exact), so the
/// row is read once and never written out as f32. `None` without AVX-512.
pub(crate) fn dot_f16(w: &[half::f16], x: &[f32]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return Some(unsafe { dot_f16_avx512(w, x) });
    }
    let _ = (w, x);
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f16_avx512(a: &[half::f16], b: &[f32]) -> f32 {
    let pa = a.as_ptr();
    dot_avx512_body!(
        a,
        b,
        |i: usize| _mm512_cvtph_ps(_mm256_loadu_si256(pa.add(i).cast())),
        |x: half::f16| x.to_f32()
    )
}

/// Four rows' [`dot_avx512_body`] at once: `x` loaded once per step for all of them and four
/// weight streams in flight (one stream at a time leaves a core short of memory speed). Each
/// row's accumulators take the same multiply-adds in the same order as the one-row loop, so
/// the results are the same bits.
#[cfg(target_arch = "x86_64")]
macro_rules! dot4_avx512_body {
    ($w:ident, $b:ident, $load:expr, $wide:expr) => {{
        use std::arch::x86_64::*;
        let n = $w.iter().map(|r| r.len()).min().unwrap_or(0).min($b.len());
        let pb = $b.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut i = 0;
        while i + 64 <= n {
            for k in 0..4 {
                let y = _mm512_loadu_ps(pb.add(i + 16 * k));
                for (r, acc) in acc.iter_mut().enumerate() {
                    acc[k] = _mm512_fmadd_ps($load(r, i + 16 * k), y, acc[k]);
                }
            }
            i += 64;
        }
        while i + 16 <= n {
            let y = _mm512_loadu_ps(pb.add(i));
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm512_fmadd_ps($load(r, i), y, acc[0]);
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for (r, (o, a)) in out.iter_mut().zip(acc).enumerate() {
            let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            let tail: f32 = $w[r][i..n]
                .iter()
                .zip(&$b[i..n])
                .map(|(x, y)| $wide(*x) * y)
                .sum();
            *o = _mm512_reduce_add_ps(sum) + tail;
        }
        out
    }};
}

/// `[w_r · x]` for four f32 rows as [`dot`] computes each; `None` without AVX-512.
pub(crate) fn dot4(w: [&[f32]; 4], x: &[f32]) -> Option<[f32; 4]> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return Some(unsafe { dot4_avx512(w, x) });
    }
    let _ = (w, x);
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512(w: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
    let p = w.map(|r| r.as_ptr());
    dot4_avx512_body!(w, b, |r: usize, i| _mm512_loadu_ps(p[r].add(i)), |x: f32| x)
}

/// [`dot4`] for f16 rows, as [`dot_f16`] computes each.
pub(crate) fn dot4_f16(w: [&[half::f16]; 4], x: &[f32]) -> Option<[f32; 4]> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return Some(unsafe { dot4_f16_avx512(w, x) });
    }
    let _ = (w, x);
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_f16_avx512(w: [&[half::f16]; 4], b: &[f32]) -> [f32; 4] {
    let p = w.map(|r| r.as_ptr());
    dot4_avx512_body!(
        w,
        b,
        |r: usize, i| _mm512_cvtph_ps(_mm256_loadu_si256(p[r].add(i).cast())),
        |x: half::f16| x.to_f32()
    )
}

/// `a · b` in 32 lanes (four AVX registers of independent sums, so additions overlap).
#[inline(always)]
fn dot_any(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Runs `f` on a worker of the thread pool. A one-token pass makes a few hundred small
/// parallel products; called from outside the pool each one hands its work over and sleeps
/// until it is done (two futex round trips), while from a worker it takes its share itself.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::current_thread_index() {
        Some(_) => f(),
        None => rayon::scope(|_| f()),
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

impl Llama {
    /// Loads the whole model, every block and the head, dequantized to f32.
    pub fn load(desc: &ModelDesc, w: &dyn Weights) -> Result<Self> {
        Self::load_with(desc, w, Kernels::Exact)
    }

    /// Loads the whole model to run on the given kernels.
    pub fn load_with(desc: &ModelDesc, w: &dyn Weights, kernels: Kernels) -> Result<Self> {
        let mut m = Self::shell(desc, w, kernels)?;
        for i in 0..desc.n_layers {
            let b = m.load_block(w, i)?;
            m.blocks.push(b);
        }
        m.load_head(w)?;
        Ok(m)
    }

    /// Loads everything but the blocks and the head: the embedding table, the final norm and
    /// the model-wide settings. Checks the dimensions and that the file has every layer.
    pub fn load_shell(desc: &ModelDesc, w: &dyn Weights) -> Result<Self> {
        Self::shell(desc, w, Kernels::Exact)
    }

    fn shell(desc: &ModelDesc, w: &dyn Weights, kernels: Kernels) -> Result<Self> {
        let gguf = w.has("token_embd.weight");
        let (embed_name, norm_name, head_name) = if gguf {
            ("token_embd.weight", "output_norm.weight", "output.weight")
        } else {
            (
                "model.embed_tokens.weight",
                "model.norm.weight",
                "lm_head.weight",
            )
        };
        let d = desc.hidden;
        let hd = desc.head_dim();
        let gemma = desc.decoder.gemma.as_ref();
        if d == 0
            || hd == 0
            || desc.n_heads == 0
            || desc.n_kv_heads == 0
            || (desc.decoder.head_dim.is_none() && !d.is_multiple_of(desc.n_heads))
            || !desc.n_heads.is_multiple_of(desc.n_kv_heads)
            || !hd.is_multiple_of(2)
        {
            bail!(
                "model dimensions do not fit together: hidden {d}, {} heads, {} kv heads",
                desc.n_heads,
                desc.n_kv_heads
            );
        }
        let (vocab, ecols) = w.matrix(embed_name)?;
        if ecols != d {
            bail!(
                "tensor '{embed_name}' is [{vocab}, {ecols}], but the model's hidden size is {d}"
            );
        }
        let mut layout = Layout {
            gguf,
            fused_qkv: false,
            fused_gate_up: false,
            norm_offset: if gemma.is_some() && !gguf { 1.0 } else { 0.0 },
            sparse_moe_names: desc.architecture.starts_with("Mixtral")
                || desc.architecture == "mixtral",
        };
        layout.fused_qkv = w.has(&layout.name(0, "attn_qkv.weight", "self_attn.qkv_proj.weight"));
        layout.fused_gate_up = desc.decoder.moe.is_none()
            && !w.has(&layout.name(0, "ffn_gate.weight", "mlp.gate_proj.weight"));
        crate::check_layer_count(w, desc.n_layers, |i| match layout.fused_qkv {
            true => layout.name(i, "attn_qkv.weight", "self_attn.qkv_proj.weight"),
            false => layout.name(i, "attn_q.weight", "self_attn.q_proj.weight"),
        })?;
        let (inv_freq, inv_freq_long) = rope_inv_freqs(desc, w, gguf)?;
        let mut m = Llama {
            desc: desc.clone(),
            embed: None,
            embed_dims: (vocab, ecols),
            embed_name: embed_name.to_string(),
            head_name: head_name.to_string(),
            final_norm_name: norm_name.to_string(),
            head: None,
            kernels,
            tied: !w.has(head_name),
            final_norm: norm_tensor(w, norm_name, d, layout.norm_offset)?,
            blocks: Vec::new(),
            layout,
            inv_freq,
            inv_freq_other: inv_freq_long,
            long_rope: false,
            gemma: gemma.map(|g| GemmaModel::new(desc, g)),
            rotation: None,
        };
        if let Some(seed) = w.rotation_seed() {
            m.rotation = Some(Box::new(m.rotations(seed)));
        }
        m.load_embedding(w)?;
        Ok(m)
    }

    /// (Re)reads the embedding table from `w`.
    pub fn load_embedding(&mut self, w: &dyn Weights) -> Result<()> {
        let packed = match self.kernels {
            Kernels::Packed => load_packed(w, &self.embed_name, self.embed_dims)?,
            Kernels::Exact => None,
        };
        self.embed = Some(match packed {
            Some(Packed::Blocks(q)) => Table::Blocks(Arc::new(q)),
            Some(Packed::BlockDot(m)) => Table::BlockDot(Arc::new(m)),
            Some(Packed::F16(m)) => Table::F16(Arc::new(m)),
            Some(Packed::Int(_) | Packed::Codebook(_)) | None => {
                let v = w.read(&self.embed_name)?;
                let (vocab, d) = self.embed_dims;
                match self.kernels {
                    Kernels::Packed => Table::F32(Arc::new(
                        RowMatrix::new(v, vocab, d).context("embedding size")?,
                    )),
                    Kernels::Exact => Table::Dense(Tensor::from_vec(v, (vocab, d), &Device::Cpu)?),
                }
            }
        });
        Ok(())
    }

    /// Frees the embedding table (a streamed calibration needs it only to embed its windows,
    /// and again at the end if it quantizes the table).
    pub fn unload_embedding(&mut self) {
        self.embed = None;
    }

    fn embedding(&self) -> Result<&Table> {
        self.embed
            .as_ref()
            .context("the embedding table is not loaded (Llama::load_embedding)")
    }

    /// Loads the output head (the embedding table's transpose when tied).
    pub fn load_head(&mut self, w: &dyn Weights) -> Result<()> {
        let dims = self.embed_dims();
        self.head = Some(if self.tied {
            let m = match self.embedding()? {
                Table::Dense(e) => Matrix::Dense(e.t()?.contiguous()?),
                Table::Blocks(q) => Matrix::Blocks(QMatMul::from_arc(q.clone())?),
                Table::BlockDot(m) => Matrix::BlockDot(m.clone()),
                Table::F16(m) => Matrix::F16(m.clone()),
                Table::F32(m) => Matrix::F32(m.clone()),
            };
            Linear::from_matrix(&self.embed_name, m, dims)
        } else {
            Linear::load(w, &self.head_name, None, dims, self.kernels)?
        });
        Ok(())
    }

    /// Names of block `i`'s linear layers in the order the block runs them (as
    /// [`Block::linears`] lists them), without reading the block.
    pub fn linear_names(&self, i: usize) -> Vec<String> {
        let l = self.layout;
        let qkv: &[(&str, &str)] = match l.fused_qkv {
            true => &[("attn_qkv", "self_attn.qkv_proj")],
            false => &[
                ("attn_q", "self_attn.q_proj"),
                ("attn_k", "self_attn.k_proj"),
                ("attn_v", "self_attn.v_proj"),
            ],
        };
        let gate_up: &[(&str, &str)] = match l.fused_gate_up {
            true => &[("ffn_up", "mlp.gate_up_proj")],
            false => &[("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj")],
        };
        let o = [("attn_output", "self_attn.o_proj")];
        let down = [("ffn_down", "mlp.down_proj")];
        let mlp: &[&[(&str, &str)]] = match self.desc.decoder.moe {
            Some(_) => &[],
            None => &[gate_up, &down],
        };
        let mut names: Vec<String> = [&[qkv, &o], mlp]
            .concat()
            .concat()
            .into_iter()
            .map(|(g, h)| l.name(i, &format!("{g}.weight"), &format!("{h}.weight")))
            .collect();
        if let Some(m) = &self.desc.decoder.moe {
            names.extend(moe::linear_names(&l, i, m));
        }
        names
    }

    /// Loads block `i` from `w`, as the file stores it (a rotated model's blocks are stored
    /// rotated; see [`Llama::rotate_block`] for rotating a source's block).
    pub fn load_block(&self, w: &dyn Weights, i: usize) -> Result<Block> {
        let desc = &self.desc;
        let (d, hd) = (desc.hidden, desc.head_dim());
        let l = self.layout;
        let gemma = desc.decoder.gemma.as_ref();
        let n = |g: &str, h: &str| l.name(i, g, h);
        let norm = |name: &str, len: usize| norm_tensor(w, name, len, l.norm_offset);
        let (q_out, kv_out, ffn) = (desc.n_heads * hd, desc.n_kv_heads * hd, desc.ffn_dim);
        let lin = |g: &str, h: &str, bias: bool, expect: (usize, usize)| {
            let name = n(&format!("{g}.weight"), &format!("{h}.weight"));
            let b = n(&format!("{g}.bias"), &format!("{h}.bias"));
            Linear::load(w, &name, bias.then_some(b.as_str()), expect, self.kernels)
        };
        let attn_norm_name = n("attn_norm.weight", "input_layernorm.weight");
        let ffn_norm_name = match gemma {
            Some(_) => n("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
            None => n("ffn_norm.weight", "post_attention_layernorm.weight"),
        };
        Ok(Block {
            attn_norm: norm(&attn_norm_name, d)?,
            attn_norm_name,
            qkv: match l.fused_qkv {
                true => vec![lin(
                    "attn_qkv",
                    "self_attn.qkv_proj",
                    true,
                    (q_out + 2 * kv_out, d),
                )?],
                false => vec![
                    lin("attn_q", "self_attn.q_proj", true, (q_out, d))?,
                    lin("attn_k", "self_attn.k_proj", true, (kv_out, d))?,
                    lin("attn_v", "self_attn.v_proj", true, (kv_out, d))?,
                ],
            },
            o: lin("attn_output", "self_attn.o_proj", false, (d, q_out))?,
            ffn_norm: norm(&ffn_norm_name, d)?,
            ffn_norm_name,
            norm_offset: l.norm_offset,
            mlp: match &desc.decoder.moe {
                Some(m) => Mlp::Moe(Box::new(moe::Experts::load(w, &l, i, m, d, self.kernels)?)),
                None => Mlp::Dense {
                    gate_up: match l.fused_gate_up {
                        true => vec![lin("ffn_up", "mlp.gate_up_proj", false, (2 * ffn, d))?],
                        false => vec![
                            lin("ffn_gate", "mlp.gate_proj", false, (ffn, d))?,
                            lin("ffn_up", "mlp.up_proj", false, (ffn, d))?,
                        ],
                    },
                    down: lin("ffn_down", "mlp.down_proj", false, (d, ffn))?,
                },
            },
            qk_norm: match desc.decoder.qk_norm {
                true => {
                    let full = desc.decoder.qk_norm_full;
                    let (qn, kn) = match full {
                        true => (q_out, kv_out),
                        false => (hd, hd),
                    };
                    Some(QkNorm {
                        q: norm(&n("attn_q_norm.weight", "self_attn.q_norm.weight"), qn)?,
                        k: norm(&n("attn_k_norm.weight", "self_attn.k_norm.weight"), kn)?,
                        full,
                    })
                }
                false => None,
            },
            post_norms: match gemma {
                Some(_) => Some(PostNorms {
                    attn: norm(&n("post_attention_norm.weight", POST_ATTN_HF), d)?,
                    ffn: norm(&n("post_ffw_norm.weight", POST_FFN_HF), d)?,
                }),
                None => None,
            },
        })
    }

    fn rotations(&self, seed: u64) -> Rotated {
        use adaptq_quant::hadamard::Rotation;
        let d = &self.desc;
        Rotated {
            seed,
            hidden: Rotation::new(d.hidden, seed),
            attn: Rotation::new(d.n_heads * d.head_dim(), seed.wrapping_add(2)),
            ffn: Rotation::new(d.ffn_dim, seed.wrapping_add(1)),
            dense: None,
        }
    }

    /// Runs the rotations a rotated model applies online as products with dense matrices, so
    /// gradients flow through them (refinement); `false` returns to the fast transform.
    pub fn set_differentiable(&mut self, on: bool) -> Result<()> {
        let Some(r) = self.rotation.as_mut() else {
            return Ok(());
        };
        r.dense = match on {
            false => None,
            true => {
                let dense = |rot: &adaptq_quant::hadamard::Rotation| -> Result<Tensor> {
                    let n = rot.n;
                    let mut m = vec![0f32; n * n];
                    m.iter_mut().step_by(n + 1).for_each(|v| *v = 1.0);
                    rot.apply_rows(&mut m);
                    Ok(Tensor::from_vec(m, (n, n), &Device::Cpu)?)
                };
                Some(Box::new([
                    dense(&r.hidden)?,
                    dense(&r.attn)?,
                    dense(&r.ffn)?,
                ]))
            }
        };
        Ok(())
    }

    /// Tells the model the context it will run at. Phi-3 files with long and short RoPE factors
    /// take the long ones past the trained context (`rope.scaling.original_context_length`),
    /// as llama.cpp chooses by its context size; the short ones are the default.
    pub fn set_context(&mut self, n_ctx: usize) {
        let trained = self
            .desc
            .decoder
            .rope_original_context
            .unwrap_or(self.desc.context_length);
        let long = n_ctx > trained;
        if let (Some(other), true) = (self.inv_freq_other.as_mut(), long != self.long_rope) {
            std::mem::swap(&mut self.inv_freq, other);
            self.long_rope = long;
        }
    }

    /// The seed of the rotation in effect, if any.
    pub fn rotation_seed(&self) -> Option<u64> {
        self.rotation.as_ref().map(|r| r.seed)
    }

    /// Rotates every linear layer's input by seeded Hadamard rotations without changing the
    /// function: weights become `W·R` (q/k/v/gate/up by the hidden-size rotation, o by the
    /// attention-output one, down by the MLP one) and the forward pass rotates their inputs.
    /// Norms, embeddings and the head are untouched. Rotating the residual stream itself
    /// (QuaRot's folding of norms, writers `Qᵀ·W`) was measured on SmolLM2 and made 3-bit RTN
    /// worse, so only inputs are rotated.
    pub fn rotate(&mut self, seed: u64) -> Result<()> {
        if self.rotation.is_some() {
            bail!("the model is already rotated");
        }
        self.rotation = Some(Box::new(self.rotations(seed)));
        let mut blocks = std::mem::take(&mut self.blocks);
        for b in &mut blocks {
            self.rotate_block(b)?;
        }
        self.blocks = blocks;
        Ok(())
    }

    /// Gives a block loaded from the unrotated source the rotations the model carries (after
    /// [`Llama::rotate`] on a shell whose blocks are loaded later).
    pub fn rotate_block(&self, b: &mut Block) -> Result<()> {
        let Some(r) = self.rotation.as_ref() else {
            bail!("the model carries no rotation");
        };
        let Mlp::Dense { gate_up, down } = &mut b.mlp else {
            bail!("rotating the inputs of a mixture of experts is not supported");
        };
        let reads_hidden = b.qkv.iter_mut().chain(gate_up);
        let pairs = reads_hidden
            .map(|l| (l, &r.hidden))
            .chain([(&mut b.o, &r.attn), (down, &r.ffn)]);
        for (l, rot) in pairs {
            let (mut w, _, _) = l.weight_rows()?;
            rot.apply_rows(&mut w);
            l.set_weight(w)?;
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_dims.0
    }

    /// Token embeddings `[T, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let v = self.vocab_size() as u32;
        if let Some(t) = tokens.iter().find(|&&t| t >= v) {
            bail!("token id {t} is outside the vocabulary of {v}");
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let x = match self.embedding()? {
            Table::Dense(e) => e.index_select(&ids, 0)?,
            Table::Blocks(q) => q.embedding(&ids)?,
            Table::BlockDot(m) => {
                Tensor::from_vec(m.rows_f32(tokens), (tokens.len(), m.dims().1), &Device::Cpu)?
            }
            Table::F16(m) => {
                Tensor::from_vec(m.rows_f32(tokens), (tokens.len(), m.dims().1), &Device::Cpu)?
            }
            Table::F32(m) => {
                Tensor::from_vec(m.rows_f32(tokens), (tokens.len(), m.dims().1), &Device::Cpu)?
            }
        };
        Ok(match &self.gemma {
            Some(g) => (x * g.embed_scale as f64)?,
            None => x,
        })
    }

    /// cos/sin tables of layer `i` for positions `pos0..pos0+t`, shaped for `x: [T, H, hd/2]`.
    fn rope_tables(&self, i: usize, pos0: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let freqs = match &self.gemma {
            Some(g) if g.cfg.sliding.get(i) == Some(&true) => &g.inv_freq_swa,
            _ => &self.inv_freq,
        };
        let half = freqs.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        let m = self.desc.decoder.rope_attn_factor.unwrap_or(1.0);
        for p in pos0..pos0 + t {
            for &f in freqs {
                let a = p as f32 * f;
                cos.push(a.cos() * m);
                sin.push(a.sin() * m);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, 1, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (t, 1, half), &Device::Cpu)?,
        ))
    }

    /// Rotates `x: [T, H, hd]`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (t, h, hd) = x.dims3()?;
        let half = hd / 2;
        Ok(match self.desc.rope_style {
            RopeStyle::AdjacentPairs => {
                let x = x.reshape((t, h, half, 2))?;
                let x0 = x.narrow(3, 0, 1)?.squeeze(3)?;
                let x1 = x.narrow(3, 1, 1)?.squeeze(3)?;
                let o0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
                let o1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
                Tensor::stack(&[o0, o1], 3)?.reshape((t, h, hd))?
            }
            RopeStyle::Halves => {
                let x0 = x.narrow(2, 0, half)?;
                let x1 = x.narrow(2, half, half)?;
                let o0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
                let o1 = (x1.broadcast_mul(cos)? + x0.broadcast_mul(sin)?)?;
                Tensor::cat(&[o0, o1], 2)?
            }
        })
    }

    /// Transformer block `i` on `x: [T, hidden]` at positions `pos0..`.
    pub fn block(
        &self,
        i: usize,
        x: &Tensor,
        pos0: usize,
        cache: Option<&mut LayerKv>,
        hook: &mut Option<Hook>,
    ) -> Result<Tensor> {
        self.block_with(&self.blocks[i], i, x, pos0, cache, hook)
    }

    /// Runs `b` as the model's block `i` (its RoPE, window and rotations): the block need not
    /// be held by the model, so calibration can stream blocks from the file.
    pub fn block_with(
        &self,
        b: &Block,
        i: usize,
        x: &Tensor,
        pos0: usize,
        cache: Option<&mut LayerKv>,
        hook: &mut Option<Hook>,
    ) -> Result<Tensor> {
        let x = self.attention_residual(b, i, x, pos0, cache, hook)?;
        let eps = self.desc.norm_eps;
        let m = self.mlp(b, &rms_norm(&x, &b.ffn_norm, eps)?, hook)?;
        let m = match &b.post_norms {
            Some(g) => g.after_ffn(&m, eps)?,
            None => m,
        };
        Ok((x + m)?)
    }

    /// The normalized input of block `b`'s MLP (as block `i`, on a window from position 0):
    /// what its router and experts read.
    pub fn mlp_input(&self, b: &Block, i: usize, x: &Tensor) -> Result<Tensor> {
        let x = self.attention_residual(b, i, x, 0, None, &mut None)?;
        rms_norm(&x, &b.ffn_norm, self.desc.norm_eps)
    }

    /// `x` plus block `b`'s attention output.
    fn attention_residual(
        &self,
        b: &Block,
        i: usize,
        x: &Tensor,
        pos0: usize,
        cache: Option<&mut LayerKv>,
        hook: &mut Option<Hook>,
    ) -> Result<Tensor> {
        let d = &self.desc;
        let (t, _) = x.dims2()?;
        let (hd, eps) = (d.head_dim(), d.norm_eps);
        let h = rms_norm(x, &b.attn_norm, eps)?;
        let h = match self.rotation.as_ref() {
            Some(r) => r.rows(&h, 0)?,
            None => h,
        };
        let (qw, kvw) = (d.n_heads * hd, d.n_kv_heads * hd);
        let [q, k, v]: [Tensor; 3] = project(&b.qkv, &h, &[qw, kvw, kvw], hook)?
            .try_into()
            .expect("three parts");
        let q = q.reshape((t, d.n_heads, hd))?;
        let k = k.reshape((t, d.n_kv_heads, hd))?;
        let v = v.reshape((t, d.n_kv_heads, hd))?;
        let (q, k) = match &b.qk_norm {
            Some(n) => n.apply(&q, &k, eps)?,
            None => (q, k),
        };
        let (cos, sin) = self.rope_tables(i, pos0, t)?;
        let q = self.rope(&q, &cos, &sin)?;
        let k = self.rope(&k, &cos, &sin)?;
        let a = match (cache, self.kernels) {
            (Some(c), Kernels::Packed) => {
                c.push(&k, &v)?;
                self.attend_direct(i, &b.o, &q, c, hook)?
            }
            (None, Kernels::Packed) => {
                let mut c = LayerKv::default();
                c.push(&k, &v)?;
                self.attend_direct(i, &b.o, &q, &c, hook)?
            }
            (Some(c), Kernels::Exact) => {
                c.push(&k, &v)?;
                let (k, v) = c.tensors(d.n_kv_heads, hd)?;
                self.attend(i, &b.o, &q, &k, &v, hook)?
            }
            (None, Kernels::Exact) => self.attend(i, &b.o, &q, &k, &v, hook)?,
        };
        let a = match &b.post_norms {
            Some(g) => g.after_attn(&a, eps)?,
            None => a,
        };
        Ok((x + a)?)
    }

    /// Block `i`'s attention of roped queries `q: [T, H, hd]` over keys and values
    /// `[S, KV, hd]` (cached positions first), through the output projection.
    fn attend(
        &self,
        i: usize,
        o: &Linear,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        hook: &mut Option<Hook>,
    ) -> Result<Tensor> {
        let (t, nh, hd) = q.dims3()?;
        let (s, nkv, _) = k.dims3()?;
        let rep = nh / nkv;
        // [H, T, hd] queries; keys/values repeated across each KV group: [H, S, hd].
        let q = q.transpose(0, 1)?.contiguous()?;
        let expand = |x: &Tensor| -> Result<Tensor> {
            let x = x.transpose(0, 1)?; // [KV, S, hd]
            Ok(x.unsqueeze(1)?
                .expand((nkv, rep, s, hd))?
                .reshape((nh, s, hd))?
                .contiguous()?)
        };
        let k = expand(k)?;
        let v = expand(v)?;
        let scale = match &self.gemma {
            Some(g) => g.cfg.query_scale as f64,
            None => 1.0 / (hd as f64).sqrt(),
        };
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match &self.gemma {
            Some(g) => g.cap_scores(scores)?,
            None => scores,
        };
        let window = self.gemma.as_ref().and_then(|g| g.window(i));
        let scores = match attention_mask(t, s, window)? {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        let probs = softmax_last(&scores)?;
        let attn = probs.matmul(&v)?.transpose(0, 1)?.reshape((t, nh * hd))?;
        let attn = match self.rotation.as_ref() {
            Some(r) => r.rows(&attn, 1)?,
            None => attn,
        };
        o.forward(&attn, hook)
    }

    /// [`Llama::attend`] for the packed runtime: each (query, head) pair is one task, its
    /// scores over the keys it may see (causal, within Gemma's window) computed, soft-capped
    /// and softmaxed in one buffer, then the values summed. No `[H, T, S]` score tensors, no
    /// keys repeated per query head, half the work of a masked product for a prompt.
    fn attend_direct(
        &self,
        i: usize,
        o: &Linear,
        q: &Tensor,
        kv: &LayerKv,
        hook: &mut Option<Hook>,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let (t, nh, hd) = q.dims3()?;
        let nkv = self.desc.n_kv_heads;
        let (rep, past, width) = (nh / nkv, kv.len - t, nkv * hd);
        let scale = match &self.gemma {
            Some(g) => g.cfg.query_scale,
            None => 1.0 / (hd as f32).sqrt(),
        };
        let cap = self.gemma.as_ref().and_then(|g| g.cfg.attn_softcap);
        let window = self.gemma.as_ref().and_then(|g| g.window(i));
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; t * nh * hd];
        let probs = |p: &mut [f32]| crate::elementwise::softmax_in_place(p, scale, cap);
        if t >= GEMM_ROWS {
            // Prompts: per block of queries and per head, scores over every key the block's
            // last query sees in one gemm, masked rows zeroed after their softmax, values
            // summed in a second gemm straight into the output's columns for that head.
            use crate::dense::{mul, Right, View};
            let row = nh * hd;
            out.par_chunks_mut(ATTN_QUERIES * row)
                .enumerate()
                .for_each(|(bi, out)| {
                    let (a, rows) = (bi * ATTN_QUERIES, out.len() / row);
                    let first = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let (lo, hi) = (first(past + a), past + a + rows);
                    let s = hi - lo;
                    let mut scores = vec![0f32; rows * s];
                    for h in 0..nh {
                        let kv0 = lo * width + (h / rep) * hd;
                        let keys = View::at(&kv.k, kv0, s, hd, width);
                        let values = View::at(&kv.v, kv0, s, hd, width);
                        let qs = View::at(&q, a * row + h * hd, rows, hd, row);
                        mul(qs, keys, Right::Transposed, &mut scores, s, false);
                        for (r, p) in scores.chunks_mut(s).enumerate() {
                            let pos = past + a + r;
                            let (from, to) = (first(pos) - lo, pos + 1 - lo);
                            probs(&mut p[from..to]);
                            p[..from].fill(0.0);
                            p[to..].fill(0.0);
                        }
                        let ps = View::dense(&scores, rows, s);
                        mul(ps, values, Right::AsIs, &mut out[h * hd..], row, false);
                    }
                });
            let attn = Tensor::from_vec(out, (t, nh * hd), &Device::Cpu)?;
            let attn = match self.rotation.as_ref() {
                Some(r) => r.rows(&attn, 1)?,
                None => attn,
            };
            return o.forward(&attn, hook);
        }
        // On rayon, tasks of at least ~64k multiply-adds: a short context's token attends on
        // one thread rather than waking the pool for a few microseconds of work. The spinning
        // team is awake already.
        let per_task = (kv.len * hd).max(1);
        let min_len = match crate::team::open() {
            true => 1,
            false => (1usize << 16).div_ceil(per_task),
        };
        crate::team::for_chunks(&mut out, min_len * hd, |c, part| {
            let mut p = Vec::new();
            for (j, out) in part.chunks_mut(hd).enumerate() {
                let th = c * min_len + j;
                let (ti, h) = (th / nh, th % nh);
                let pos = past + ti;
                let keys = Keys {
                    kv,
                    width,
                    at: (h / rep) * hd,
                    lo: window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                    pos,
                };
                keys.attend(&q[th * hd..(th + 1) * hd], &mut p, &probs, out);
            }
        });
        let attn = Tensor::from_vec(out, (t, nh * hd), &Device::Cpu)?;
        let attn = match self.rotation.as_ref() {
            Some(r) => r.rows(&attn, 1)?,
            None => attn,
        };
        o.forward(&attn, hook)
    }

    /// Block `b`'s MLP on its normalized input: SwiGLU, or GeGLU (tanh GELU) for Gemma.
    fn mlp(&self, b: &Block, h: &Tensor, hook: &mut Option<Hook>) -> Result<Tensor> {
        let (gate_up, down) = match &b.mlp {
            Mlp::Dense { gate_up, down } => (gate_up, down),
            Mlp::Moe(e) => return e.forward(h, hook),
        };
        let rot = self.rotation.as_ref();
        let h = match rot {
            Some(r) => r.rows(h, 0)?,
            None => h.clone(),
        };
        let ffn = self.desc.ffn_dim;
        let [g, u]: [Tensor; 2] = project(gate_up, &h, &[ffn, ffn], hook)?
            .try_into()
            .expect("two parts");
        let mid = match (&self.gemma, self.kernels) {
            (Some(_), _) => (g.gelu()? * u)?,
            (None, Kernels::Exact) => (g.silu()? * u)?,
            (None, Kernels::Packed) => {
                let (g, u) = (g.contiguous()?, u.contiguous()?);
                let (g1, u1) = (g.flatten_all()?, u.flatten_all()?);
                let mut out = vec![0f32; g1.elem_count()];
                crate::elementwise::swiglu(&g1.to_vec1()?, &u1.to_vec1()?, &mut out);
                Tensor::from_vec(out, g.dims(), &Device::Cpu)?
            }
        };
        let mid = match rot {
            Some(r) => r.rows(&mid, 2)?,
            None => mid,
        };
        down.forward(&mid, hook)
    }

    /// Final norm and output head: logits `[T, vocab]`.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self
            .head_layer()?
            .forward(&self.final_normed(x)?, &mut None)?;
        match &self.gemma {
            Some(g) => g.cap_logits(logits),
            None => Ok(logits),
        }
    }

    fn head_layer(&self) -> Result<&Linear> {
        self.head
            .as_ref()
            .context("the output head is not loaded (Llama::load_head)")
    }

    /// The final norm's output: the output head's input.
    pub fn final_normed(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.final_norm, self.desc.norm_eps)
    }

    /// `(vocab, hidden)` of the embedding table.
    pub fn embed_dims(&self) -> (usize, usize) {
        self.embed_dims
    }

    /// True when the output head is the embedding table (tied weights).
    pub fn tied(&self) -> bool {
        self.tied
    }

    /// The output head, row-major `[vocab, hidden]` (the embedding table when tied).
    pub fn head_rows(&self) -> Result<Vec<f32>> {
        Ok(self.head_layer()?.weight_rows()?.0)
    }

    /// The embedding table, row-major `[vocab, hidden]`.
    pub fn embedding_rows(&self) -> Result<Vec<f32>> {
        let e = match self.embedding()? {
            Table::Dense(e) => e.clone(),
            Table::Blocks(q) => q.dequantize(&Device::Cpu)?,
            Table::BlockDot(m) => Tensor::from_vec(m.dequantize(), m.dims(), &Device::Cpu)?,
            Table::F16(m) => Tensor::from_vec(m.to_f32(), m.dims(), &Device::Cpu)?,
            Table::F32(m) => Tensor::from_vec(m.to_f32(), m.dims(), &Device::Cpu)?,
        };
        Ok(e.flatten_all()?.to_vec1()?)
    }

    /// The final norm's weight (as multiplied).
    pub fn final_norm(&self) -> &Tensor {
        &self.final_norm
    }

    /// The final norm's weight as its file stores it.
    pub fn final_norm_stored(&self) -> Result<Vec<f32>> {
        let off = self.layout.norm_offset;
        Ok(self
            .final_norm
            .to_vec1::<f32>()?
            .into_iter()
            .map(|x| x - off)
            .collect())
    }

    /// Replaces the final norm's weight; see [`Block::set_norms`].
    pub fn set_final_norm(&mut self, w: Tensor) -> Result<()> {
        if w.dims() != self.final_norm.dims() {
            bail!("final norm weight of the wrong size");
        }
        self.final_norm = w;
        Ok(())
    }

    /// The output head when it is not the embedding table.
    pub fn head_mut(&mut self) -> Option<&mut Linear> {
        match self.tied {
            true => None,
            false => self.head.as_mut(),
        }
    }

    /// Replaces the embedding table (and the head when tied) by `e: [vocab, hidden]` without
    /// copying, so a table computed from `Var`s carries gradients back to them.
    pub fn set_embedding_tensor(&mut self, e: Tensor) -> Result<()> {
        if e.dims2()? != self.embed_dims {
            bail!(
                "embedding table is {:?}, the model's is {:?}",
                e.dims(),
                self.embed_dims
            );
        }
        if self.tied && self.head.is_some() {
            let m = Matrix::Dense(e.t()?);
            self.head = Some(Linear::from_matrix(&self.embed_name, m, self.embed_dims));
        }
        self.embed = Some(Table::Dense(e));
        Ok(())
    }

    /// Replaces the embedding table (and the head when tied), e.g. with a quantized one.
    pub fn set_embedding(&mut self, rows: Vec<f32>) -> Result<()> {
        let e = Tensor::from_vec(rows, self.embed_dims, &Device::Cpu)?;
        if self.tied && self.head.is_some() {
            let m = Matrix::Dense(e.t()?.contiguous()?);
            self.head = Some(Linear::from_matrix(&self.embed_name, m, self.embed_dims));
        }
        self.embed = Some(Table::Dense(e));
        Ok(())
    }

    /// Full forward pass over `tokens` at positions `cache.len()..`; logits `[T, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
        hook: Option<Hook>,
    ) -> Result<Tensor> {
        match hook {
            Some(h) => self.head(&self.hidden(tokens, cache, Some(h))?),
            None => self.on_threads(tokens.len(), || {
                self.head(&self.hidden(tokens, cache, None)?)
            }),
        }
    }

    /// Logits of the last position only, `[1, vocab]`: what generation needs after a prompt,
    /// and what llama-bench's prompt test computes (the head is a fifth of a small model's work
    /// per token).
    pub fn forward_last(&self, tokens: &[u32], cache: Option<&mut KvCache>) -> Result<Tensor> {
        if tokens.is_empty() {
            bail!("no tokens to run");
        }
        self.on_threads(tokens.len(), || {
            let h = self.hidden(tokens, cache, None)?;
            let t = h.dims()[0];
            self.head(&h.narrow(0, t - 1, 1)?)
        })
    }

    /// Logits for positions `from..` only: the output head is a fifth of the work of a
    /// 512-token window, so skipping rows nobody scores matters.
    pub fn forward_from(&self, tokens: &[u32], from: usize) -> Result<Tensor> {
        on_pool(|| {
            let h = self.hidden(tokens, None, None)?;
            let t = h.dims()[0];
            self.head(&h.narrow(0, from, t - from)?)
        })
    }

    /// Runs a pass of `t` new tokens: a few tokens on the packed kernels on the spinning team
    /// (a pass is hundreds of products of microseconds), anything else on rayon's pool.
    fn on_threads<R: Send>(&self, t: usize, f: impl FnOnce() -> R + Send) -> R {
        match self.kernels == Kernels::Packed && t < GEMM_ROWS {
            true => crate::team::session(f),
            false => on_pool(f),
        }
    }

    /// Hidden states after the last block (before the final norm), `[T, hidden]`.
    pub fn hidden(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
        mut hook: Option<Hook>,
    ) -> Result<Tensor> {
        let mut x = self.embed(tokens)?;
        match cache {
            Some(c) => {
                let pos0 = c.len();
                c.layers.resize_with(self.blocks.len(), LayerKv::default);
                for (i, slot) in c.layers.iter_mut().enumerate() {
                    x = self.block(i, &x, pos0, Some(slot), &mut hook)?;
                }
            }
            None => {
                for i in 0..self.blocks.len() {
                    x = self.block(i, &x, 0, None, &mut hook)?;
                }
            }
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// adaptq's own kernels give one function whatever the batch: a batch (rounded in place,
    /// weight dequantized in parallel, one gemm) and its rows one at a time agree to float
    /// rounding, for GGML blocks, an integer grid with a short last group, and f32 rows.
    #[test]
    fn kernel_batches_compute_what_single_rows_compute() {
        use adaptq_quant::ggml::{quantize_rtn as ggml_rtn, BlockType};
        use adaptq_quant::{quantize_rtn, Grid, RtnConfig};
        let (n, k, t) = (DEQUANT_ROWS + 9, 256, GEMM_ROWS + 5);
        let wave = |i: usize, a: f32| ((i as f32 * a).sin() + 0.3 * (i as f32 * 0.37).cos()) * 0.1;
        let w: Vec<f32> = (0..n * k).map(|i| wave(i, 0.71)).collect();
        let x: Vec<f32> = (0..t * k).map(|i| wave(i, 1.31) * 3.0).collect();
        let x = Tensor::from_vec(x, (t, k), &Device::Cpu).unwrap();
        let int = quantize_rtn(&w, n, k, &RtnConfig::new(3, 48, Grid::Asymmetric)).unwrap();
        let kernels: Vec<(&str, Box<dyn RowKernel>)> = vec![
            ("f32", Box::new(RowMatrix::new(w.clone(), n, k).unwrap())),
            ("int3 g48", Box::new(IntMatrix::new(&int).unwrap())),
            (
                "Q4_K",
                Box::new(
                    BlockMatrix::new(
                        BlockType::Q4K,
                        ggml_rtn(BlockType::Q4K, &w, n, k, None, false).unwrap(),
                        n,
                        k,
                    )
                    .unwrap(),
                ),
            ),
            (
                "Q5_0",
                Box::new(
                    BlockMatrix::new(
                        BlockType::Q5_0,
                        ggml_rtn(BlockType::Q5_0, &w, n, k, None, false).unwrap(),
                        n,
                        k,
                    )
                    .unwrap(),
                ),
            ),
        ];
        for (name, m) in &kernels {
            let batch = kernel_forward(m.as_ref(), &x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (r, want) in batch.iter().enumerate() {
                let one = kernel_forward(m.as_ref(), &x.narrow(0, r, 1).unwrap()).unwrap();
                for (a, b) in one.to_vec2::<f32>().unwrap()[0].iter().zip(want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{name} row {r}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// A packed layer gives one function whatever the batch: rows multiplied one at a time by
    /// candle's block kernels and a batch rounded and multiplied in f32 agree to float
    /// rounding, for every activation type (Q8_0, Q8_1, Q8_K).
    #[test]
    fn packed_batches_compute_what_single_rows_compute() {
        let (n, k, t) = (24, 512, GEMM_ROWS + 3);
        let wave = |i: usize, a: f32| ((i as f32 * a).sin() + 0.3 * (i as f32 * 0.37).cos()) * 0.1;
        let w = Tensor::from_vec(
            (0..n * k).map(|i| wave(i, 0.71)).collect(),
            (n, k),
            &Device::Cpu,
        )
        .unwrap();
        let x: Vec<f32> = (0..t * k).map(|i| wave(i, 1.31) * 3.0).collect();
        let x = Tensor::from_vec(x, (t, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let l = Linear::from_matrix(
                "w",
                Matrix::Blocks(QMatMul::from_qtensor(q).unwrap()),
                (n, k),
            );
            let batch = l.forward(&x, &mut None).unwrap().to_vec2::<f32>().unwrap();
            for (r, want) in batch.iter().enumerate() {
                let one = l.forward(&x.narrow(0, r, 1).unwrap(), &mut None).unwrap();
                let one = one.to_vec2::<f32>().unwrap().remove(0);
                for (a, b) in one.iter().zip(want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{dtype:?} row {r}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
