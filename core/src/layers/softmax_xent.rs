//! Softmax cross-entropy, the loss head. Always computed in f32 (autocast's rule for softmax and losses),
//! whatever dtype the logits are stored in.

use crate::arena::Buf;
use crate::backend::{Backend, LossTo};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxCrossEntropy {
    pub classes: usize,
}

impl SoftmaxCrossEntropy {
    // logits: [B, N], labels: [B] i32 -> loss[0] = mean_b (logsumexp(logits_b) - logits_b[label_b])
    // and, fused, the backward: dlogits = (softmax(logits) - onehot(labels)) * scale / B
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward<B: Backend>(
        &self,
        be: &mut B,
        logits: Buf,
        labels: Buf,
        rows: usize,
        loss: Buf,
        dlogits: Buf,
        scale: f32,
    ) -> Result<()> {
        be.softmax_cross_entropy(logits, labels, rows, self.classes, loss, dlogits, scale)
    }

    /// The loss of a step decided on the device: [`SoftmaxCrossEntropy::forward_backward`] with `scale` further
    /// multiplied by the loss scale held in the step-control block `ctl` (read where the data is), and the
    /// step's counts written to the block (see [`LossTo`]). `dlogits_f32` is f32 room for the gradient before it
    /// is rounded to a 16-bit `dlogits`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_to<B: Backend>(
        &self,
        be: &mut B,
        logits: Buf,
        labels: Buf,
        rows: usize,
        loss: Buf,
        dlogits: Buf,
        dlogits_f32: Buf,
        scale: f32,
        ctl: Buf,
    ) -> Result<()> {
        let classes = self.classes;
        be.softmax_cross_entropy_to(&LossTo {
            logits,
            labels,
            rows,
            classes,
            loss,
            dlogits,
            dlogits_f32,
            grad_scale: scale,
            ctl,
        })
    }
}
