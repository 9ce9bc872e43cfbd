//! 2-D convolution (stride, zero padding) as im2col + matrix product, weight `[OC, C, K, K]` as in PyTorch.

use super::{Bwd, Fwd, Params};
use crate::backend::{Backend, ConvGeom, Gemm};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2d {
    pub geom: ConvGeom,
    pub out_channels: usize,
    /// Start of this layer's parameters: weight `[OC, C*K*K]`, then bias `[OC]`.
    pub param_offset: usize,
}

impl Conv2d {
    pub fn param_len(&self) -> usize {
        self.out_channels * self.geom.col_rows() + self.out_channels
    }
    pub fn weight_offset(&self) -> usize {
        self.param_offset
    }
    pub fn bias_offset(&self) -> usize {
        self.param_offset + self.out_channels * self.geom.col_rows()
    }

    // x: [B, C, H, W] -> cols: [B, CKK, P] -> y_n = W cols_n: [B, OC, P] (+ b per channel)
    pub fn forward<B: Backend>(&self, be: &mut B, p: &Params, io: &Fwd) -> Result<()> {
        let g = &self.geom;
        let (oc, ckk, pos, rows) = (self.out_channels, g.col_rows(), g.col_cols(), io.rows);
        let w = p.working.slice(self.weight_offset(), oc * ckk);
        let b = p.working.slice(self.bias_offset(), oc);
        be.im2col(io.x, g, rows, io.scratch)?;
        let gemm = Gemm::new(oc, pos, ckk, w, io.scratch, io.y).batched(rows, 0, ckk * pos, oc * pos);
        be.gemm(&gemm)?;
        be.add_bias(io.y, b, rows, oc, pos)
    }

    // dy: [B, OC, P] -> db = sum dy; dW = sum_n dy_n cols_n^T: [OC, CKK]; dcols_n = W^T dy_n -> col2im -> dx
    pub fn backward<B: Backend>(&self, be: &mut B, p: &Params, io: &Bwd) -> Result<()> {
        let g = &self.geom;
        let (oc, ckk, pos, rows) = (self.out_channels, g.col_rows(), g.col_cols(), io.rows);
        let dw = p.grad.slice(self.weight_offset(), oc * ckk);
        let db = p.grad.slice(self.bias_offset(), oc);
        be.bias_grad(io.dy, db, rows, oc, pos)?;
        // The forward columns were overwritten by later layers' scratch use: recompute them.
        be.im2col(io.x, g, rows, io.scratch)?;
        for n in 0..rows {
            // dW (+)= dy_n [OC, P] * cols_n^T; cols_n stored [CKK, P] = [n, k] of op(B)
            let dy_n = io.dy.slice(n * oc * pos, oc * pos);
            let cols_n = io.scratch.slice(n * ckk * pos, ckk * pos);
            let beta = if n == 0 { 0.0 } else { 1.0 };
            be.gemm(&Gemm::new(oc, ckk, pos, dy_n, cols_n, dw).b_t(pos).beta(beta))?;
        }
        if let Some(dx) = io.dx {
            let w = p.working.slice(self.weight_offset(), oc * ckk);
            // dcols_n = W^T dy_n: W stored [OC, CKK] = [k, m] of op(A); reuse the scratch for dcols.
            let gemm = Gemm::new(ckk, pos, oc, w, io.dy, io.scratch).a_t(ckk).batched(rows, 0, oc * pos, ckk * pos);
            be.gemm(&gemm)?;
            be.col2im(io.scratch, g, rows, dx)?;
        }
        Ok(())
    }
}
