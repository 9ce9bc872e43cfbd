//! GELU, tanh form (PyTorch's `approximate="tanh"`, GPT-2's):
//! `y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.

use super::{Bwd, Fwd, Shape};
use crate::backend::{Activation, Backend};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gelu {
    pub shape: Shape,
}

impl Gelu {
    // x: [B, S] -> y: [B, S]
    pub fn forward<B: Backend>(&self, be: &mut B, io: &Fwd) -> Result<()> {
        let n = io.rows * self.shape.len();
        be.activation(Activation::GeluTanh, io.x.prefix(n), io.y.prefix(n))
    }

    // dx = dy * gelu'(x), from the saved input x
    pub fn backward<B: Backend>(&self, be: &mut B, io: &Bwd) -> Result<()> {
        let n = io.rows * self.shape.len();
        match io.dx {
            Some(dx) => be.activation_backward(Activation::GeluTanh, io.x.prefix(n), io.dy.prefix(n), dx.prefix(n)),
            None => Ok(()),
        }
    }
}
