//! 2-D convolution (stride, zero padding) as im2col + matrix product, weight `[OC, C, K, K]` as in PyTorch.

use super::{block_count, weight_block, Bwd, Fwd, LayerParams};
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
    pub fn forward<B: Backend>(&self, be: &mut B, p: &LayerParams, io: &Fwd) -> Result<()> {
        let g = &self.geom;
        let (oc, ckk, pos, rows) = (self.out_channels, g.col_rows(), g.col_cols(), io.rows);
        let d = io.x.dtype;
        be.im2col(io.x, g, rows, io.scratch)?;
        // y_n[o0..o0+on] = W[o0..o0+on] cols_n: one block of output channels unless W needs converting.
        let per = block_count(p.weight, d, p.widen, ckk, oc)?;
        let mut o0 = 0;
        while o0 < oc {
            let on = per.min(oc - o0);
            let (w, ldw) = weight_block(be, p.weight, ckk, (o0, on), (0, ckk), d, p.widen)?;
            let y = io.y.slice(o0 * pos, (rows - 1) * oc * pos + on * pos);
            let mut gemm = Gemm::new(on, pos, ckk, w, io.scratch, y).batched(rows, 0, ckk * pos, oc * pos);
            gemm.lda = ldw;
            be.gemm(&gemm)?;
            o0 += on;
        }
        be.add_bias(io.y, p.bias, rows, oc, pos)
    }

    // dy: [B, OC, P] -> db = sum dy; dW = sum_n dy_n cols_n^T: [OC, CKK]; dcols_n = W^T dy_n -> col2im -> dx
    pub fn backward<B: Backend>(&self, be: &mut B, p: &LayerParams, io: &Bwd) -> Result<()> {
        let g = &self.geom;
        let (oc, ckk, pos, rows) = (self.out_channels, g.col_rows(), g.col_cols(), io.rows);
        if let Some(db) = p.dbias {
            be.bias_grad(io.dy, db, rows, oc, pos)?;
        }
        if let Some(dw) = p.dweight {
            // The forward columns were overwritten by later layers' scratch use: recompute them.
            be.im2col(io.x, g, rows, io.scratch)?;
            for n in 0..rows {
                // dW (+)= dy_n [OC, P] * cols_n^T; cols_n stored [CKK, P] = [n, k] of op(B)
                let dy_n = io.dy.slice(n * oc * pos, oc * pos);
                let cols_n = io.scratch.slice(n * ckk * pos, ckk * pos);
                let beta = if n == 0 { 0.0 } else { 1.0 };
                be.gemm(&Gemm::new(oc, ckk, pos, dy_n, cols_n, dw).b_t(pos).beta(beta))?;
            }
        }
        if let Some(dx) = io.dx {
            // dcols_n[c0..c0+cn] = W[:, c0..c0+cn]^T dy_n: W stored [OC, CKK] = [k, m] of op(A); the scratch
            // holds dcols. Blocks of W's columns when it needs converting.
            let d = io.dy.dtype;
            let per = block_count(p.weight, d, p.widen, oc, ckk)?;
            let mut c0 = 0;
            while c0 < ckk {
                let cn = per.min(ckk - c0);
                let (w, ldw) = weight_block(be, p.weight, ckk, (0, oc), (c0, cn), d, p.widen)?;
                let cols = io.scratch.slice(c0 * pos, (rows - 1) * ckk * pos + cn * pos);
                let gemm = Gemm::new(cn, pos, oc, w, io.dy, cols).a_t(ldw).batched(rows, 0, oc * pos, ckk * pos);
                be.gemm(&gemm)?;
                c0 += cn;
            }
            be.col2im(io.scratch, g, rows, dx)?;
        }
        Ok(())
    }
}
