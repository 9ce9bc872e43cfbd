//! Fully connected layer: `y = x W^T + b`, weight `[O, I]` as in PyTorch.

use super::{Bwd, Fwd, Params};
use crate::backend::{Backend, Gemm};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    /// Start of this layer's parameters in the flat vectors: weight `[O, I]`, then bias `[O]`.
    pub param_offset: usize,
}

impl Linear {
    pub fn param_len(&self) -> usize {
        self.out_features * self.in_features + self.out_features
    }
    pub fn weight_offset(&self) -> usize {
        self.param_offset
    }
    pub fn bias_offset(&self) -> usize {
        self.param_offset + self.out_features * self.in_features
    }

    // x: [B, I], W: [O, I], b: [O] -> y: [B, O]
    pub fn forward<B: Backend>(&self, be: &mut B, p: &Params, io: &Fwd) -> Result<()> {
        let (i, o, rows) = (self.in_features, self.out_features, io.rows);
        let w = p.working.slice(self.weight_offset(), o * i);
        let b = p.working.slice(self.bias_offset(), o);
        // y = x W^T: op(B) = W^T, W stored [O, I]
        be.gemm(&Gemm::new(rows, o, i, io.x, w, io.y).b_t(i))?;
        be.add_bias(io.y, b, rows, o, 1)
    }

    // dy: [B, O] -> dW = dy^T x: [O, I], db = sum_rows dy: [O], dx = dy W: [B, I]
    pub fn backward<B: Backend>(&self, be: &mut B, p: &Params, io: &Bwd) -> Result<()> {
        let (i, o, rows) = (self.in_features, self.out_features, io.rows);
        let dw = p.grad.slice(self.weight_offset(), o * i);
        let db = p.grad.slice(self.bias_offset(), o);
        // op(A) = dy^T: dy stored [B, O] = [k, m]
        be.gemm(&Gemm::new(o, i, rows, io.dy, io.x, dw).a_t(o))?;
        be.bias_grad(io.dy, db, rows, o, 1)?;
        if let Some(dx) = io.dx {
            let w = p.working.slice(self.weight_offset(), o * i);
            be.gemm(&Gemm::new(rows, i, o, io.dy, w, dx))?;
        }
        Ok(())
    }
}
