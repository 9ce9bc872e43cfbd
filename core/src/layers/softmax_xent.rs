//! Softmax cross-entropy, the loss head. Always computed in f32 (autocast's rule for softmax and losses),
//! whatever dtype the logits are stored in.

use crate::arena::Buf;
use crate::backend::Backend;
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

    /// [`SoftmaxCrossEntropy::forward_backward`] with `scale` further multiplied by the loss scale held in the
    /// step-control block `ctl` (read where the data is).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_scaled<B: Backend>(
        &self,
        be: &mut B,
        logits: Buf,
        labels: Buf,
        rows: usize,
        loss: Buf,
        dlogits: Buf,
        scale: f32,
        ctl: Buf,
    ) -> Result<()> {
        be.softmax_cross_entropy_scaled(logits, labels, rows, self.classes, loss, dlogits, scale, ctl)
    }
}
