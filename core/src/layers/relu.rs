//! `y = max(x, 0)`, element-wise. NaN passes through (as in PyTorch), so check-numerics can see it.

use super::{Bwd, Fwd, Shape};
use crate::backend::{Activation, Backend};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Relu {
    pub shape: Shape,
}

impl Relu {
    // x: [B, S] -> y: [B, S]
    pub fn forward<B: Backend>(&self, be: &mut B, io: &Fwd) -> Result<()> {
        let n = io.rows * self.shape.len();
        be.activation(Activation::Relu, io.x.prefix(n), io.y.prefix(n))
    }

    // dx = dy * (x > 0)
    pub fn backward<B: Backend>(&self, be: &mut B, io: &Bwd) -> Result<()> {
        let n = io.rows * self.shape.len();
        match io.dx {
            Some(dx) => be.activation_backward(Activation::Relu, io.x.prefix(n), io.dy.prefix(n), dx.prefix(n)),
            None => Ok(()),
        }
    }
}
