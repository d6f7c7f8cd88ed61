//! The sparse mixture-of-experts MLP of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, computed as
//! llama.cpp's `build_moe_ffn` computes it: router logits, a softmax over all experts, the
//! `used` most probable experts per token, their probabilities as weights (divided by their
//! sum where the architecture says so), each chosen expert a SwiGLU MLP on the rows routed to
//! it, and Qwen2-MoE's shared expert on every row, gated by `sigmoid(w · x)`.
//!
//! Each expert is a [`Linear`] like any other, so quantizers, bundles and kernels need nothing
//! new; the hook sees each expert's input as the rows routed to it, which is what per-expert
//! calibration wants.

use super::{Hook, Layout, Linear};
use crate::Kernels;
use crate::Weights;
use adaptq_source::gguf::expert_name;
use adaptq_source::model::Moe;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

pub struct Expert {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Expert {
    /// SwiGLU on `x: [rows, hidden]`.
    fn forward(&self, x: &Tensor, hook: &mut Option<Hook>) -> Result<Tensor> {
        let mid = (self.gate.forward(x, hook)?.silu()? * self.up.forward(x, hook)?)?;
        self.down.forward(&mid, hook)
    }

    /// The input of `down` for inputs `x`: `silu(gate · x) ⊙ (up · x)`.
    pub fn mid(&self, x: &Tensor) -> Result<Tensor> {
        Ok((self.gate.forward(x, &mut None)?.silu()? * self.up.forward(x, &mut None)?)?)
    }

    fn linears(&self) -> [&Linear; 3] {
        [&self.gate, &self.up, &self.down]
    }
}

/// Qwen2-MoE's shared expert and its gate.
pub struct Shared {
    pub mlp: Expert,
    /// `[hidden, 1]`: the gate's logit is `x · w`.
    gate: Tensor,
}

pub struct Experts {
    /// `[experts, hidden]`, kept in float ([`adaptq_source::model::TensorRole::Router`]).
    pub router: Linear,
    pub experts: Vec<Expert>,
    pub shared: Option<Shared>,
    used: usize,
    norm_weights: bool,
}

/// Names of block `i`'s expert layers, gate, up and down of each expert in turn (GGUF: the
/// per-expert matrices [`expert_name`] cuts from the stacked tensors; Hugging Face: Mixtral's
/// `block_sparse_moe.experts.J.w1/w3/w2` or the others' `mlp.experts.J.*_proj`), then the
/// shared expert's.
pub(super) fn linear_names(l: &Layout, i: usize, moe: &Moe) -> Vec<String> {
    let mut v = Vec::with_capacity(3 * moe.experts + 3);
    let parts = [
        ("gate", "gate_proj", "w1"),
        ("up", "up_proj", "w3"),
        ("down", "down_proj", "w2"),
    ];
    for j in 0..moe.experts {
        for (g, h, mixtral) in parts {
            v.push(match (l.gguf, l.sparse_moe_names) {
                (true, _) => expert_name(&format!("blk.{i}.ffn_{g}_exps"), j),
                (false, true) => {
                    format!("model.layers.{i}.block_sparse_moe.experts.{j}.{mixtral}.weight")
                }
                (false, false) => format!("model.layers.{i}.mlp.experts.{j}.{h}.weight"),
            });
        }
    }
    if moe.shared_ffn.is_some() {
        for (g, h) in [
            ("gate", "gate_proj"),
            ("up", "up_proj"),
            ("down", "down_proj"),
        ] {
            v.push(l.name(
                i,
                &format!("ffn_{g}_shexp.weight"),
                &format!("mlp.shared_expert.{h}.weight"),
            ));
        }
    }
    v
}

impl Experts {
    pub(super) fn load(
        w: &dyn Weights,
        l: &Layout,
        i: usize,
        moe: &Moe,
        hidden: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        let names = linear_names(l, i, moe);
        let mlp = |n: &[String], ffn: usize| -> Result<Expert> {
            let lin = |name: &String, dims| Linear::load(w, name, None, dims, kernels);
            Ok(Expert {
                gate: lin(&n[0], (ffn, hidden))?,
                up: lin(&n[1], (ffn, hidden))?,
                down: lin(&n[2], (hidden, ffn))?,
            })
        };
        let experts = names
            .chunks(3)
            .take(moe.experts)
            .map(|n| mlp(n, moe.expert_ffn))
            .collect::<Result<Vec<_>>>()?;
        let shared = match moe.shared_ffn {
            Some(ffn) => {
                let name = l.name(
                    i,
                    "ffn_gate_inp_shexp.weight",
                    "mlp.shared_expert_gate.weight",
                );
                let g = w.read(&name)?;
                if g.len() != hidden {
                    bail!(
                        "tensor '{name}' holds {} values, the shared expert's gate needs {hidden}",
                        g.len()
                    );
                }
                Some(Shared {
                    mlp: mlp(&names[3 * moe.experts..], ffn)?,
                    gate: Tensor::from_vec(g, (hidden, 1), &Device::Cpu)?,
                })
            }
            None => None,
        };
        let router = match l.sparse_moe_names {
            true => l.name(i, "ffn_gate_inp.weight", "block_sparse_moe.gate.weight"),
            false => l.name(i, "ffn_gate_inp.weight", "mlp.gate.weight"),
        };
        Ok(Experts {
            router: Linear::load(w, &router, None, (moe.experts, hidden), kernels)?,
            experts,
            shared,
            used: moe.used,
            norm_weights: moe.norm_weights,
        })
    }

    /// Every quantizable layer, in [`linear_names`] order (the router is not one).
    pub fn linears(&self) -> Vec<&Linear> {
        let shared = self.shared.iter().map(|s| &s.mlp);
        self.experts
            .iter()
            .chain(shared)
            .flat_map(Expert::linears)
            .collect()
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let shared = self.shared.iter_mut().map(|s| &mut s.mlp);
        self.experts
            .iter_mut()
            .chain(shared)
            .flat_map(|e| [&mut e.gate, &mut e.up, &mut e.down])
            .collect()
    }

    /// The rows each expert is routed, with their weights, from logits `[T, experts]`.
    fn route(&self, logits: &Tensor) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
        let (t, n) = logits.dims2()?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let mut routed = vec![(Vec::new(), Vec::new()); n];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for (row, l) in logits.chunks_exact(n).enumerate().take(t) {
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().map(|&v| v as f64).sum();
            let p: Vec<f32> = e.iter().map(|&v| (v as f64 / sum) as f32).collect();
            order.clear();
            order.extend(0..n);
            // Highest first; ties keep the lower index, as a stable sort would.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top = &order[..self.used];
            let total: f32 = top.iter().map(|&j| p[j]).sum();
            // llama.cpp clamps the sum to the smallest normal f16 before dividing.
            let div = if self.norm_weights {
                total.max(6.103_515_6e-5)
            } else {
                1.0
            };
            for &j in top {
                routed[j].0.push(row as u32);
                routed[j].1.push(p[j] / div);
            }
        }
        Ok(routed)
    }

    /// The rows of `h: [T, hidden]` the router sends each expert.
    pub fn routed_rows(&self, h: &Tensor) -> Result<Vec<Vec<u32>>> {
        let routed = self.route(&self.router.forward(h, &mut None)?)?;
        Ok(routed.into_iter().map(|(rows, _)| rows).collect())
    }

    /// The mixture's output for normalized inputs `h: [T, hidden]`.
    pub(super) fn forward(&self, h: &Tensor, hook: &mut Option<Hook>) -> Result<Tensor> {
        let (t, d) = h.dims2()?;
        let routed = self.route(&self.router.forward(h, hook)?)?;
        let dev = Device::Cpu;
        let mut out = Tensor::zeros((t, d), h.dtype(), &dev)?;
        for (e, (rows, weights)) in self.experts.iter().zip(routed) {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let ids = Tensor::from_vec(rows, n, &dev)?;
            let y = e.forward(&h.index_select(&ids, 0)?, hook)?;
            let y = y.broadcast_mul(&Tensor::from_vec(weights, (n, 1), &dev)?)?;
            out = out.index_add(&ids, &y, 0)?;
        }
        if let Some(s) = &self.shared {
            let logit = h.matmul(&s.gate)?;
            let gate = (logit.neg()?.exp()? + 1.0)?.recip()?;
            out = (out + s.mlp.forward(h, hook)?.broadcast_mul(&gate)?)?;
        }
        Ok(out)
    }
}
