//! Scaled batches of windows as tensors.

use burn::prelude::*;

use super::{Scaler, WindowSet};

impl WindowSet {
    /// Inputs and targets of the windows at `indices`, scaled.
    ///
    /// # Shapes
    /// - inputs: `[indices.len(), t_in, channels, height, width]`
    /// - targets: `[indices.len(), t_out, channels, height, width]`
    pub fn batch<B: Backend>(
        &self,
        indices: &[usize],
        scaler: &Scaler,
        device: &B::Device,
    ) -> (Tensor<B, 5>, Tensor<B, 5>) {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for &i in indices {
            scaler.scale_into(self.input(i), &mut x);
            scaler.scale_into(self.target(i), &mut y);
        }
        let n = indices.len();
        let (c, h, w) = (self.channels, self.height, self.width);
        (
            Tensor::from_data(TensorData::new(x, [n, self.t_in, c, h, w]), device),
            Tensor::from_data(TensorData::new(y, [n, self.t_out, c, h, w]), device),
        )
    }

    /// The scaled persistence forecast of window `i`: its last input frame, `t_out` times.
    pub fn persistence(&self, i: usize, scaler: &Scaler, out: &mut Vec<f32>) {
        let f = self.frame_len();
        let last = &self.input(i)[(self.t_in - 1) * f..];
        for _ in 0..self.t_out {
            scaler.scale_into(last, out);
        }
    }
}
