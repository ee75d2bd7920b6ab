//! The method's losses: the FLOPs budget and the optional supervision of S; the annealing of the
//! keep ratios.

use burn::prelude::*;

use crate::macs::MacModel;

/// Keep ratio at `progress` in [0, 1] of the warm-up: from 1 down to `target`, linearly.
pub fn annealed(target: f32, progress: f32) -> f32 {
    if progress >= 1.0 {
        target
    } else {
        1.0 - (1.0 - target) * progress.max(0.0)
    }
}

/// `(F(M) / F_dense - rho_target)^2`, averaged over the batch, where F(M) is the expected MACs
/// from the soft masks: `always + spatial * space_0 + sum_l (macs_l + pairwise_l * space_l) *
/// space_l * units_l` (`always`: the layers no mask touches plus the method's own cost;
/// `spatial`: the layers only the DataMask prunes) and F_dense the same at all-ones masks.
///
/// `soft_fractions[l]` holds the per-sample soft kept fractions `(space, units)` of layer l,
/// each `[batch]`; `rho_target` is the fraction implied by the current keep ratios
/// ([`crate::macs::MacModel::budget_fraction`]).
pub fn budget_loss<B: Backend>(
    mac_model: &MacModel,
    soft_fractions: &[(Tensor<B, 1>, Tensor<B, 1>)],
    rho_target: f32,
) -> Tensor<B, 1> {
    let always_macs = (mac_model.backbone_fixed + mac_model.method) as f64;
    let spatial = mac_model.backbone_spatial as f64;
    let dense = always_macs + spatial + (0..mac_model.layers.len()).map(|l| mac_model.layer(l, 1.0, 1.0)).sum::<f64>();
    // The layers only the DataMask prunes follow layer 0's kept positions.
    let mut expected: Option<Tensor<B, 1>> =
        soft_fractions.first().filter(|_| spatial > 0.0).map(|(space, _)| space.clone() * (spatial / dense) as f32);
    for (l, (space, units)) in soft_fractions.iter().enumerate() {
        let (linear, pairwise) = (mac_model.layers[l] as f64 / dense, mac_model.pairwise[l] as f64 / dense);
        let term = (space.clone() * pairwise as f32 + linear as f32) * space.clone() * units.clone();
        expected = Some(match expected {
            Some(e) => e + term,
            None => term,
        });
    }
    match expected {
        Some(e) => (e + (always_macs / dense) as f32 - rho_target).powi_scalar(2).mean(),
        None => Tensor::zeros([1], &Default::default()),
    }
}

/// Binary cross-entropy between S and the patches whose target frames hold signal: a patch is
/// a target patch when any of its target values (any frame, channel) exceeds `level` (scaled
/// units; missing values never do). It teaches the generator where the future holds something
/// to compute (rain, traffic) instead of leaving that to the straight-through gradient alone.
///
/// # Shapes
/// - importance: S `[batch, hp, wp]` in [0, 1]
/// - target: `[batch, t_out, channels, height, width]`, `height <= hp * patch`, `width <= wp * patch`
/// - output: `[1]`
pub fn mask_target_loss<B: Backend>(
    importance: Tensor<B, 3>,
    target: Tensor<B, 5>,
    patch: usize,
    level: f32,
) -> Tensor<B, 1> {
    let [b, t, c, h, w] = target.dims();
    let target = target.clone().mask_fill(target.is_nan(), f32::NEG_INFINITY);
    let peak = target.reshape([b, t * c, h, w]).max_dim(1);
    let peak = burn::tensor::module::max_pool2d(peak, [patch, patch], [patch, patch], [0, 0], [1, 1], true);
    let [_, hp, wp] = importance.dims();
    let wanted = peak.reshape([b, hp, wp]).greater_elem(level).float();
    let s = importance.clamp(1e-6, 1.0 - 1e-6);
    let bce = wanted.clone() * s.clone().log() + (wanted.neg() + 1.0) * (s.neg() + 1.0).log();
    bce.mean().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainBackend;

    #[test]
    fn anneals_from_one_to_target() {
        assert_eq!(annealed(0.4, 0.0), 1.0);
        assert!((annealed(0.4, 0.5) - 0.7).abs() < 1e-6);
        assert_eq!(annealed(0.4, 2.0), 0.4);
    }

    #[test]
    fn mask_target_marks_patches_with_signal_and_pulls_s_towards_them() {
        let device = Default::default();
        // One sample, 2 frames, 3x5 pixels, patch 2: a 2x3 patch grid (the last row and column cut).
        let mut y = vec![0.0f32; 2 * 3 * 5];
        y[4] = 0.5; // frame 0, pixel (0, 4): patch (0, 2)
        y[15 + 2 * 5 + 1] = 0.9; // frame 1, pixel (2, 1): patch (1, 0)
        y[3] = f32::NAN; // missing, patch (0, 1): not a target
        let y = Tensor::<TrainBackend, 5>::from_data(TensorData::new(y, [1, 2, 1, 3, 5]), &device);
        let s =
            Tensor::<TrainBackend, 3>::from_data(TensorData::new(vec![0.5f32; 6], [1, 2, 3]), &device).require_grad();
        let loss = mask_target_loss(s.clone(), y.clone(), 2, 0.1);
        assert!((loss.clone().into_scalar() - std::f32::consts::LN_2).abs() < 1e-5);
        let g: Vec<f32> = s.grad(&loss.backward()).unwrap().into_data().to_vec().unwrap();
        let wanted = [false, false, true, true, false, false];
        for (i, (&gi, &w)) in g.iter().zip(&wanted).enumerate() {
            assert!(if w { gi < 0.0 } else { gi > 0.0 }, "patch {i}: gradient {gi}");
        }
        // Above every value: no target patch at all.
        let none = mask_target_loss(s.clone(), y, 2, 1.0);
        let g: Vec<f32> = s.grad(&none.backward()).unwrap().into_data().to_vec().unwrap();
        assert!(g.iter().all(|&gi| gi > 0.0));
    }

    #[test]
    fn budget_is_zero_on_target_and_has_gradient() {
        let device = Default::default();
        let s = Tensor::<TrainBackend, 1>::from_floats([0.5, 0.5], &device).require_grad();
        let u = Tensor::<TrainBackend, 1>::from_floats([1.0, 1.0], &device);
        // fixed 20, layer 80: expected fraction 0.2 + 0.8 * 0.5 = 0.6
        let m = MacModel { backbone_fixed: 15, backbone_spatial: 0, layers: vec![80], pairwise: vec![0], method: 5 };
        let on = budget_loss(&m, &[(s.clone(), u.clone())], 0.6);
        assert!(on.into_scalar().abs() < 1e-12);
        let off = budget_loss(&m, &[(s.clone(), u)], 0.4);
        let grads = off.backward();
        let g: Vec<f32> = s.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert!(g.iter().all(|&v| v > 0.0), "pushing the budget down must push S down: {g:?}");
    }
}
