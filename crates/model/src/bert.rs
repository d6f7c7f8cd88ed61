//! BERT encoder (MiniLM): absolute position and token-type embeddings, post-LayerNorm blocks,
//! GELU MLP, mean pooling over the attention mask for sentence embeddings.

use crate::llama::softmax_last;
use crate::Weights;
use adaptq_source::model::ModelDesc;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};

struct Dense {
    wt: Tensor,
    b: Tensor,
}

impl Dense {
    fn load(w: &dyn Weights, prefix: &str) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let (rows, cols) = w.matrix(&name)?;
        let wt = Tensor::from_vec(w.read(&name)?, (rows, cols), &Device::Cpu)?
            .t()?
            .contiguous()?;
        let b = Tensor::from_vec(w.read(&format!("{prefix}.bias"))?, rows, &Device::Cpu)?;
        Ok(Dense { wt, b })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.wt)?.broadcast_add(&self.b)?)
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

impl LayerNorm {
    fn load(w: &dyn Weights, prefix: &str) -> Result<Self> {
        let r = |s: &str| -> Result<Tensor> {
            let v = w.read(&format!("{prefix}.{s}"))?;
            let n = v.len();
            Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
        };
        Ok(LayerNorm {
            w: r("weight")?,
            b: r("bias")?,
        })
    }
    fn forward(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(xc
            .broadcast_div(&(var + eps as f64)?.sqrt()?)?
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)?)
    }
}

struct Layer {
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    ln1: LayerNorm,
    up: Dense,
    down: Dense,
    ln2: LayerNorm,
}

pub struct Bert {
    desc: ModelDesc,
    word: Tensor,
    pos: Tensor,
    ttype: Tensor,
    ln: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    pub fn load(desc: &ModelDesc, w: &dyn Weights) -> Result<Self> {
        // `encode` splits the hidden size evenly across heads; a description that came from a
        // file (a re-hashed bundle's model.meta, say) is checked here too, so a zero head count
        // is an error rather than a division by zero.
        let (d, nh) = (desc.hidden, desc.n_heads);
        if d == 0 || nh == 0 || !d.is_multiple_of(nh) {
            bail!("model dimensions do not fit together: hidden {d}, {nh} heads");
        }
        let table = |name: &str| -> Result<Tensor> {
            Ok(Tensor::from_vec(
                w.read(name)?,
                w.matrix(name)?,
                &Device::Cpu,
            )?)
        };
        crate::check_layer_count(w, desc.n_layers, |i| {
            format!("encoder.layer.{i}.attention.self.query.weight")
        })?;
        let mut layers = Vec::new();
        for i in 0..desc.n_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: Dense::load(w, &format!("{p}.attention.self.query"))?,
                k: Dense::load(w, &format!("{p}.attention.self.key"))?,
                v: Dense::load(w, &format!("{p}.attention.self.value"))?,
                o: Dense::load(w, &format!("{p}.attention.output.dense"))?,
                ln1: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"))?,
                up: Dense::load(w, &format!("{p}.intermediate.dense"))?,
                down: Dense::load(w, &format!("{p}.output.dense"))?,
                ln2: LayerNorm::load(w, &format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            desc: desc.clone(),
            word: table("embeddings.word_embeddings.weight")?,
            pos: table("embeddings.position_embeddings.weight")?,
            ttype: table("embeddings.token_type_embeddings.weight")?,
            ln: LayerNorm::load(w, "embeddings.LayerNorm")?,
            layers,
        })
    }

    /// Hidden states `[T, hidden]` of one sequence (no padding, all tokens attended).
    pub fn encode(&self, ids: &[u32]) -> Result<Tensor> {
        let t = ids.len();
        if t == 0 || t > self.pos.dims()[0] {
            bail!(
                "sequence of {t} tokens; BERT takes 1 to {}",
                self.pos.dims()[0]
            );
        }
        let dev = Device::Cpu;
        let idt = Tensor::new(ids, &dev)?;
        let pos = Tensor::new((0..t as u32).collect::<Vec<_>>().as_slice(), &dev)?;
        let zeros = Tensor::new(vec![0u32; t].as_slice(), &dev)?;
        let x = (self.word.index_select(&idt, 0)? + self.pos.index_select(&pos, 0)?)?;
        let x = (x + self.ttype.index_select(&zeros, 0)?)?;
        let eps = self.desc.norm_eps;
        let mut x = self.ln.forward(&x, eps)?;
        let nh = self.desc.n_heads;
        let hd = self.desc.hidden / nh;
        for l in &self.layers {
            let split = |y: Tensor| -> Result<Tensor> {
                Ok(y.reshape((t, nh, hd))?.transpose(0, 1)?.contiguous()?)
            };
            let q = split(l.q.forward(&x)?)?;
            let k = split(l.k.forward(&x)?)?;
            let v = split(l.v.forward(&x)?)?;
            let s = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
            let a = softmax_last(&s)?
                .matmul(&v)?
                .transpose(0, 1)?
                .reshape((t, nh * hd))?;
            x = l.ln1.forward(&(l.o.forward(&a)? + &x)?, eps)?;
            let m = l.down.forward(&l.up.forward(&x)?.gelu_erf()?)?;
            x = l.ln2.forward(&(m + &x)?, eps)?;
        }
        Ok(x)
    }

    /// Mean-pooled sentence embedding (the sentence-transformers recipe for MiniLM; not
    /// normalized, so cosine similarity is the comparison to use).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.encode(ids)?.mean(0)?.to_vec1::<f32>()?)
    }
}
