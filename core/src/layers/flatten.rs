//! `[B, C, H, W] -> [B, C*H*W]`: a view, no data moves (NCHW is already row-major flat).
//! Forward and backward are in [`super::Layer`]: the output buffer is the input buffer.

use super::Shape;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Flatten {
    /// The input shape.
    pub shape: Shape,
}
