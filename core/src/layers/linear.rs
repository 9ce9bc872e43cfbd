//! Fully connected layer: `y = x W^T + b`, weight `[O, I]` as in PyTorch.

use super::{block_count, weight_block, Bwd, Fwd, LayerParams};
use crate::arena::Buf;
use crate::backend::{Activation, Backend, Epilogue, Gemm, LinearActBackward, LinearActForward};
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
    pub fn forward<B: Backend>(&self, be: &mut B, p: &LayerParams, io: &Fwd) -> Result<()> {
        let (i, o, rows) = (self.in_features, self.out_features, io.rows);
        let d = io.x.dtype;
        // y[:, o0..o0+on] = x W[o0..o0+on]^T: one block when W is stored in the compute dtype, else blocks of
        // rows converted into p.widen. Each output is the same f32 dot product over I either way.
        let per = block_count(p.weight, d, p.widen, i, o)?;
        let mut o0 = 0;
        while o0 < o {
            let on = per.min(o - o0);
            let (w, ldw) = weight_block(be, p.weight, i, (o0, on), (0, i), d, p.widen)?;
            // op(B) = W^T: W stored [O, I]; C is a column block of y with leading dimension O.
            let mut g = Gemm::new(rows, on, i, io.x, w, io.y.slice(o0, (rows - 1) * o + on)).b_t(ldw);
            g.ldc = o;
            be.gemm(&g)?;
            o0 += on;
        }
        be.add_bias(io.y, p.bias, rows, o, 1)
    }

    // dy: [B, O] -> dW = dy^T x: [O, I], db = sum_rows dy: [O], dx = dy W: [B, I]
    pub fn backward<B: Backend>(&self, be: &mut B, p: &LayerParams, io: &Bwd) -> Result<()> {
        let (i, o, rows) = (self.in_features, self.out_features, io.rows);
        if let Some(dw) = p.dweight {
            // op(A) = dy^T: dy stored [B, O] = [k, m]
            be.gemm(&Gemm::new(o, i, rows, io.dy, io.x, dw).a_t(o))?;
        }
        if let Some(db) = p.dbias {
            be.bias_grad(io.dy, db, rows, o, 1)?;
        }
        if let Some(dx) = io.dx {
            // dx[:, c0..c0+cn] = dy W[:, c0..c0+cn]: blocks of columns of W when it needs converting.
            let d = io.dy.dtype;
            let per = block_count(p.weight, d, p.widen, o, i)?;
            let mut c0 = 0;
            while c0 < i {
                let cn = per.min(i - c0);
                let (w, ldw) = weight_block(be, p.weight, i, (0, o), (c0, cn), d, p.widen)?;
                let mut g = Gemm::new(rows, cn, o, io.dy, w, dx.slice(c0, (rows - 1) * i + cn));
                g.ldb = ldw;
                g.ldc = i;
                be.gemm(&g)?;
                c0 += cn;
            }
        }
        Ok(())
    }

    /// `out = x W^T` over `io.rows` rows, the weight stored in the compute dtype: the GEMM of the fused forwards.
    fn gemm_xwt(&self, p: &LayerParams, io: &Fwd, out: Buf) -> Gemm {
        let (i, o) = (self.in_features, self.out_features);
        Gemm::new(io.rows, o, i, io.x, p.weight, out.prefix(io.rows * o)).b_t(i)
    }

    /// This layer and the activation after it in one fused GEMM: `pre = x W^T + b` (this layer's output,
    /// `io.y`) and `y = act(pre)` (the activation's output). The weight must be stored in the compute dtype.
    pub fn forward_act<B: Backend>(
        &self,
        be: &mut B,
        p: &LayerParams,
        io: &Fwd,
        act: Activation,
        y: Buf,
    ) -> Result<()> {
        let pre = io.y.prefix(io.rows * self.out_features);
        be.gemm_fused(&self.gemm_xwt(p, io, y), &Epilogue::BiasAct { bias: p.bias, act, pre })
    }

    /// [`Linear::forward`] with the bias added in the GEMM's epilogue (where the backend fuses it). The weight
    /// must be stored in the compute dtype.
    pub fn forward_bias<B: Backend>(&self, be: &mut B, p: &LayerParams, io: &Fwd) -> Result<()> {
        be.gemm_fused(&self.gemm_xwt(p, io, io.y), &Epilogue::Bias { bias: p.bias })
    }

    /// This layer fed by activation `act` of `pre` (the previous layer's output), in one op: `y = act(pre) W^T
    /// + b`, with room `x` for the activation's output (see [`Backend::linear_act_forward`]). Returns whether
    /// `x` was written. The weight must be stored in the compute dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_after_act<B: Backend>(
        &self,
        be: &mut B,
        p: &LayerParams,
        act: Activation,
        pre: Buf,
        x: Buf,
        y: Buf,
        rows: usize,
    ) -> Result<bool> {
        let (i, o) = (self.in_features, self.out_features);
        be.linear_act_forward(&LinearActForward { act, rows, i, o, pre, x, w: p.weight, b: p.bias, y })
    }

    /// [`Linear::backward`] through the activation before this layer: `dx = (dy W) * act'(pre)`, the gradient
    /// with respect to the activation's input `pre`, with the layer's own gradients and the bias gradient of the
    /// linear layer producing `pre` (`prev_dbias`, when given), as [`Backend::linear_act_backward`] fuses them
    /// (one fused GEMM on every backend; one pass for a classifier layer on the GPU). `io.dx` must be set; the
    /// weight must be stored in the compute dtype. `x_valid`: whether `io.x` holds `act(pre)` (see
    /// [`Linear::forward_after_act`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_act<B: Backend>(
        &self,
        be: &mut B,
        p: &LayerParams,
        io: &Bwd,
        act: Activation,
        pre: Buf,
        prev_dbias: Option<Buf>,
        x_valid: bool,
    ) -> Result<()> {
        let dx = io.dx.ok_or(crate::error::Error::InvalidConfig("internal: backward_act without an input gradient"))?;
        be.linear_act_backward(&LinearActBackward {
            act,
            rows: io.rows,
            i: self.in_features,
            o: self.out_features,
            dy: io.dy,
            x: io.x,
            x_valid,
            pre,
            w: p.weight,
            dx,
            dw: p.dweight,
            db: p.dbias,
            prev_dbias,
        })
    }
}
