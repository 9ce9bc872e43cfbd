//! 2-D max pooling without padding; the position of each maximum is kept for the backward pass.

use super::{Bwd, Fwd};
use crate::backend::{Backend, PoolGeom};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxPool2d {
    pub geom: PoolGeom,
}

impl MaxPool2d {
    // x: [B, C, H, W] -> y: [B, C, OH, OW], aux (argmax): [B, C, OH, OW] i32
    pub fn forward<B: Backend>(&self, be: &mut B, io: &Fwd) -> Result<()> {
        be.maxpool(io.x, &self.geom, io.rows, io.y, io.aux)
    }

    // dx[argmax] += dy, zero elsewhere
    pub fn backward<B: Backend>(&self, be: &mut B, io: &Bwd) -> Result<()> {
        match io.dx {
            Some(dx) => be.maxpool_backward(io.dy, io.aux, &self.geom, io.rows, dx),
            None => Ok(()),
        }
    }
}
